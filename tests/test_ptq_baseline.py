"""Every build also measures plain PTQ of the same plan, and never ships a QAT model that scores below it."""

from __future__ import annotations

import json

import pytest

from edgeq.configs import BuildConfig, QATConfig


@pytest.mark.slow
def test_a_qat_run_that_hurts_the_model_ships_the_ptq_program_and_says_so(tmp_path):
    from edgeq.pipeline import build

    # A learning rate far too high for this model, and no early stopping to save it: QAT wrecks
    # the model, calibration alone does not.
    config = BuildConfig(
        out=tmp_path / "out",
        precision="int8",
        qat=QATConfig(steps=40, lr=5.0, patience=0),
        max_drop=100.0,
        debug_program=False,
        equalization=True,  # every PTQ method, the opt-in ones too
        clipping=True,
    )
    result = build(None, config)
    s = result.scores
    assert s.ptq is not None and s.qat_reference is not None
    assert s.qat_reference < s.ptq - 5, (s.qat_reference, s.ptq)
    # The digits CNN has a conv -> ReLU -> conv pair to equalize and histograms to clip.
    assert set(s.candidates) == {
        "qat", "ptq", "ptq+equalization", "ptq+clipping", "ptq+bias-correction", "ptq+rounding",
        "ptq+equalization+clipping+rounding",
    }  # fmt: skip
    # The choice is made on the held-out training slice, and it agrees with the evaluation data here.
    assert s.shipped.startswith("ptq")
    # the lowest held-out loss ships, or a simpler candidate the held-out samples cannot tell from it
    assert min(s.candidates, key=lambda n: s.candidates[n]["holdout_loss"]) == s.lowest
    assert s.shipped == s.lowest or len(s.shipped.split("+")) < len(s.lowest.split("+")), (s.shipped, s.lowest)
    assert "held-out" in s.selected_on
    assert s.reference == s.candidates[s.shipped]["metric"] and abs(s.program - s.reference) <= 1.0
    assert s.agreement["reference_vs_program"] >= 97.0
    report = json.loads((result.out_dir / "report.json").read_text())
    assert report["accuracy"]["shipped"] == s.shipped
    html = (result.out_dir / "report.html").read_text()
    assert f"shipped the lowest: <b>{s.shipped}</b>" in html
    assert "PTQ + bias correction (converted reference)" in html and "PTQ, calibration only" in html


def test_ptq_comparison_can_be_turned_off_and_is_validated():
    from edgeq.errors import EdgeqError

    assert BuildConfig(ptq_batches=0).ptq_batches == 0
    with pytest.raises(EdgeqError, match="ptq_batches"):
        BuildConfig(ptq_batches=-1)


def test_qat_does_not_train_the_users_float_model_in_place(tmp_path):
    """torch.export shares parameter tensors with the module it exports; QAT must train a copy."""
    import torch

    from edgeq.pipeline import build
    from edgeq.recipe import load_recipe

    recipe = load_recipe(None)
    model = recipe.model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    recipe.model = lambda: model  # the build gets this very object
    build(
        recipe,
        BuildConfig(
            out=tmp_path / "out", qat=QATConfig(steps=20, lr=0.5), max_drop=100.0, debug_program=False, ptq_batches=0
        ),
    )
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
