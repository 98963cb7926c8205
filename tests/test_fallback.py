"""Accuracy fallback: when the quantized model misses --max-drop, its most damaging layers go back to float."""

from __future__ import annotations

import json

import pytest
import torch
from recipes import fragile_mlp
from torch import nn

from edgeq.configs import BuildConfig, QATConfig
from edgeq.errors import EdgeqError


@pytest.mark.slow
def test_a_layer_that_breaks_int8_goes_to_float_and_the_build_says_what_it_cost(tmp_path):
    from edgeq.pipeline import build

    config = BuildConfig(
        out=tmp_path / "out",
        precision="int8",
        qat=QATConfig(steps=0),
        max_drop=2.0,
        debug_program=False,
        bias_correction=False,
    )
    result = build(fragile_mlp(), config)
    report = json.loads((result.out_dir / "report.json").read_text())
    fallback = report["fallback"]
    assert fallback is not None and fallback["shipped"]
    assert fallback["start_metric"] < result.scores.float - 2.0  # int8 everywhere missed the goal
    assert fallback["steps"][0]["layer"] == "4"  # the layer reading the wrecked activation, found first
    # It stops at the first step whose held-out drop is within --max-drop with 95% confidence.
    steps = fallback["steps"]
    assert all(not step["confident"] for step in steps[:-1])
    for step in steps:
        assert step["drop_low"] <= step["drop"] <= step["drop_high"]
        assert step["confident"] == (step["drop_high"] <= 2.0)
    assert result.scores.shipped.endswith("+float-fallback")
    # Each step quantizes the weights that shipped: QAT's when QAT shipped (no BatchNorm here).
    assert fallback["weights"] == ("QAT-trained" if result.scores.shipped.startswith("qat") else "float")
    assert result.plan.precision_of("4") == "fp16"  # the narrowest float precision on the android menu
    assert result.drop <= 2.0
    assert report["accuracy"]["program"] == result.scores.program
    # The price, measured: the program with the float layer against the same build without it.
    assert fallback["program_bytes_without"] < report["size"]["program_bytes"]
    assert fallback["program_ms_without"] > 0 and report["latency"]["program_ms"] > 0
    html = (result.out_dir / "report.html").read_text()
    assert "Accuracy fallback" in html and "layer sent to float" in html


def test_fallback_setting_is_validated():
    assert BuildConfig(fallback_layers=0).fallback_layers == 0
    with pytest.raises(EdgeqError, match="fallback_layers"):
        BuildConfig(fallback_layers=-1)


def test_trained_weights_go_back_into_the_float_model_unless_batchnorm_was_folded():
    import copy

    from edgeq.backends import load_target, quant_spec
    from edgeq.capture import capture_for_quantization
    from edgeq.planning.plan import uniform_plan
    from edgeq.quant.convert import prepare
    from edgeq.quant.qat import trained_float

    target = load_target("android")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    example = (torch.randint(0, 20, (1, 5)),)
    plan = uniform_plan(mlp, target, "int8", example_inputs=example)
    prepared = prepare(capture_for_quantization(mlp, example, True), quant_spec(plan, target))
    with torch.no_grad():
        prepared.get_parameter("1.weight").add_(1.0)  # what training did
        prepared.get_parameter("0.weight").add_(1.0)
    before = copy.deepcopy(mlp.state_dict())
    trained = trained_float(mlp, prepared, keep=("0.weight",))
    assert trained is not None and trained is not mlp
    assert torch.equal(trained[1].weight, before["1.weight"] + 1.0)
    assert torch.equal(trained[0].weight, before["0.weight"])  # kept as the model had it
    assert all(torch.equal(v, before[k]) for k, v in mlp.state_dict().items())  # the float model untouched

    convbn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    images = (torch.randn(1, 3, 8, 8),)
    plan = uniform_plan(convbn, target, "int8", example_inputs=images)
    folded = prepare(capture_for_quantization(convbn, images, True), quant_spec(plan, target))
    assert trained_float(convbn, folded) is None


def test_a_drop_the_held_out_samples_cannot_tell_from_none_sends_nothing_to_float():
    from edgeq.checks.stats import Paired
    from edgeq.planning.fallback import not_worth_it

    # 2 photos of 75 (2.7 points, over --max-drop 1): McNemar cannot tell that from no drop
    noise = Paired(2.67, -1.3, 6.7, 0.5, 75, "McNemar", (1, 3))
    assert "not distinguishable from no drop (p = 0.5)" in not_worth_it(noise)
    real = Paired(12.0, 5.3, 18.7, 0.0005, 75, "McNemar", (0, 9))
    assert not_worth_it(real) == ""
