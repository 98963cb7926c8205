"""Every decision a build makes is taken on held-out training data; the evaluation data is only reported."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from recipes import fragile_mlp

from edgeq.configs import BuildConfig, QATConfig


def _lying(recipe):
    """The same recipe with evaluation targets that disagree with every model: rolled labels."""
    ((x, y),) = list(recipe.eval_data())
    return dataclasses.replace(recipe, eval_data=lambda: iter([(x, torch.roll(y, 1))]))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", None], ids=["uniform", "planned"])
def test_eval_data_that_disagrees_with_held_out_data_changes_no_decision(tmp_path, precision):
    """Uniform int8 exercises candidates, plan checks and the fallback; planned, the analysis and planner too."""
    from edgeq.pipeline import build

    config = BuildConfig(precision=precision, qat=QATConfig(steps=0), max_drop=2.0, debug_program=False)
    honest = build(fragile_mlp(), dataclasses.replace(config, out=tmp_path / "honest"))
    lying = build(_lying(fragile_mlp()), dataclasses.replace(config, out=tmp_path / "lying"))
    # The two evaluations disagree completely ...
    assert honest.scores.float > 80.0 and lying.scores.float < 30.0
    reports = [json.loads((r.out_dir / "report.json").read_text()) for r in (honest, lying)]
    # ... and no decision moved: the same candidate, the same fallback steps, the same program.
    if precision == "int8":  # eval drop ~0, held-out missed: an eval-driven fallback would not have run
        assert reports[1]["fallback"] is not None and reports[1]["fallback"]["shipped"]
    assert reports[0]["plan"] == reports[1]["plan"]
    if reports[0]["analysis"] is not None:
        assert [layer["metric_drop"] for layer in reports[0]["analysis"]["layers"]] == [
            layer["metric_drop"] for layer in reports[1]["analysis"]["layers"]
        ]
    assert honest.scores.shipped == lying.scores.shipped
    assert [c["holdout_loss"] for c in honest.scores.candidates.values()] == [
        c["holdout_loss"] for c in lying.scores.candidates.values()
    ]
    assert reports[0]["plan_checks"] == reports[1]["plan_checks"]
    assert (honest.out_dir / "model.pte").read_bytes() == (lying.out_dir / "model.pte").read_bytes()
    decided = [{k: v for k, v in (r["fallback"] or {}).items() if k != "program_ms_without"} for r in reports]
    assert decided[0] == decided[1]  # host latency aside


def test_a_simpler_candidate_ships_when_held_out_data_cannot_tell_it_from_the_lowest():
    from edgeq.quant.candidates import _simplest_as_good

    gen = torch.Generator().manual_seed(0)
    base = torch.rand(128, generator=gen)
    noise = 0.05 * torch.randn(128, generator=gen)
    # QAT lowest by a hair: PTQ (simplest) is as good on these samples, and ships.
    same = {"qat": base, "ptq": base + noise + 0.001, "ptq+bias-correction": base + 0.5}
    shipped, evidence = _simplest_as_good(same, "qat")
    assert shipped == "ptq" and evidence["ptq"]["low"] <= 0 <= evidence["ptq"]["high"]
    assert evidence["ptq+bias-correction"]["low"] > 0 and evidence["ptq"]["samples"] == 128
    # PTQ clearly worse, bias correction as good: bias correction ships.
    worse = {"qat": base, "ptq": base + 0.2, "ptq+bias-correction": base + noise}
    assert _simplest_as_good(worse, "qat")[0] == "ptq+bias-correction"
    # Both clearly worse: the lowest ships; the simplest lowest needs no test.
    apart = {"qat": base, "ptq": base + 0.2, "ptq+bias-correction": base + 0.3}
    assert _simplest_as_good(apart, "qat")[0] == "qat"
    assert _simplest_as_good(same, "ptq") == ("ptq", {})
