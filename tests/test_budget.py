"""--size-budget is a promise: a lowered program that misses it is narrowed and lowered again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeq.configs import BuildConfig, QATConfig
from edgeq.errors import EdgeqError


def _optimistic_target(tmp_path: Path) -> Path:
    """android's menu with int8 and w8dyn per-channel costs left out: the planner then predicts
    programs a little smaller than XNNPACK writes, as a user's hand-written menu might."""
    text = (Path(__file__).resolve().parent.parent / "targets" / "android.toml").read_text()
    text = text.replace('name = "android"', 'name = "android-optimistic"', 1)
    text = text.replace("channel_bytes = { conv = 8, linear = 8, embedding = 4 }", "channel_bytes = 0")
    path = tmp_path / "optimistic.toml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_a_program_over_the_budget_is_narrowed_until_it_fits(tmp_path):
    from edgeq.pipeline import build

    budget = 12_250  # the planner's head at w8dyn is predicted to fit; its program is 78 bytes over
    config = BuildConfig(
        target=_optimistic_target(tmp_path), size_budget=budget, out=tmp_path / "out", qat=QATConfig(steps=30)
    )
    result = build(None, config, max_drop=100)
    assert result is not None and result.sizes["program_bytes"] <= budget
    report = json.loads((result.out_dir / "report.json").read_text())
    steps = report["size_budget_narrowing"]
    assert steps and steps[0]["excess_bytes"] > 0 and steps[0]["narrowed"] == ["head"]
    assert steps[-1]["program_bytes"] == len((result.out_dir / "model.pte").read_bytes())
    assert "narrowed after the lowered program missed --size-budget" in result.plan.layers[-1].reason
    assert "--size-budget kept" in (result.out_dir / "report.html").read_text()


@pytest.mark.slow
def test_a_budget_no_plan_can_meet_is_one_line_and_writes_nothing(tmp_path):
    from edgeq.pipeline import build

    out = tmp_path / "out"
    config = BuildConfig(target=_optimistic_target(tmp_path), size_budget=12_000, out=out, qat=QATConfig(steps=0))
    with pytest.raises(EdgeqError, match="over --size-budget 12,000, and no layer can be narrowed further") as info:
        build(None, config, max_drop=100)
    assert "\n" not in str(info.value) and not out.exists()
