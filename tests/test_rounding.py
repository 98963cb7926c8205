"""Weight scales and rounding fitted per layer (edgeq.quant.rounding), on the real PT2E -> XNNPACK stack."""

from __future__ import annotations

import copy

import torch
from recipes import recipe_of
from torch import nn

from edgeq import capture, upstream
from edgeq.backends import load_target, quant_spec
from edgeq.configs import QATConfig
from edgeq.lower import lower
from edgeq.planning.plan import uniform_plan
from edgeq.quant.ptq import post_training_quantize
from edgeq.quant.rounding import RoundingConfig, _layers, _weight_of, fit_rounding
from edgeq.runtime import ProgramRunner


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.a(x))))))
        return self.fc(x.mean((2, 3)))


def _setup(target_name: str = "android", precision: str = "w4a8"):
    upstream.apply()
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():  # one outlier weight per depthwise channel 0: its max-abs scale wastes the grid
        model.dw.weight[0, 0, 0, 0] = 4.0 * model.dw.weight.abs().max()
    data = torch.randn(48, 3, 12, 12)
    recipe = recipe_of(model, [(data[:24], torch.zeros(24, dtype=torch.long)), (data[24:], torch.zeros(24))])
    target = load_target(target_name)
    plan = uniform_plan(model, target, precision, example_inputs=(data[:1],))
    reference = post_training_quantize(model, recipe, quant_spec(plan, target, qat=False), QATConfig(), batches=2)
    float_graph = capture.capture_for_quantization(model, (data[:1],), True)
    return model, data, target, reference, float_graph


def test_fitted_layers_reproduce_float_better_and_the_program_runs_them():
    model, data, target, reference, float_graph = _setup()
    fitted = copy.deepcopy(reference)
    result = fit_rounding(fitted, float_graph, (data[:32],), RoundingConfig(iterations=60, batch=16))
    assert len(result.layers) == 4 and result.samples == 32
    for name, row in result.layers.items():
        assert row["after"] <= row["before"], name
    before = sum(r["before"] for r in result.layers.values())
    after = sum(r["after"] for r in result.layers.values())
    assert after < 0.9 * before, (before, after)
    # the outlier channel's scale was clipped; rounding moved some weights the other way
    assert result.layers["conv2d_1"]["rescaled_channels"] >= 1
    assert any(row["changed"] > 0 for row in result.layers.values())
    for node in _layers(fitted).values():
        weight = _weight_of(fitted, node)
        assert weight is not None and weight.integers.dtype == torch.int8
        assert int(weight.integers.min()) >= weight.qmin and int(weight.integers.max()) <= weight.qmax
    # held-out samples (not fitted on) agree better with float too
    held = data[32:]
    with torch.no_grad():
        want = model(held)
        error_before = float((reference(held) - want).pow(2).mean())
        error_after = float((fitted(held) - want).pow(2).mean())
    assert error_after < error_before, (error_before, error_after)
    # what lowering reads is what was fitted: the XNNPACK program computes the fitted reference
    program = ProgramRunner(lower(fitted, (data[:1],), target).program)
    with torch.no_grad():
        expected = fitted(held)
    got = program(held)
    step = float((expected.max() - expected.min()) / 255)
    assert float((got - expected).abs().max()) <= 2 * step
    assert float((got - want).pow(2).mean()) < error_before


def test_scale_search_alone_and_a_no_op_when_nothing_helps():
    _, data, _, reference, float_graph = _setup()
    searched = copy.deepcopy(reference)
    result = fit_rounding(searched, float_graph, (data[:32],), RoundingConfig(iterations=0))
    assert result.layers["conv2d_1"]["rescaled_channels"] >= 1
    assert result.layers["conv2d_1"]["after"] < result.layers["conv2d_1"]["before"]
    same = copy.deepcopy(reference)
    nothing = fit_rounding(same, float_graph, (data[:32],), RoundingConfig(iterations=0, ratios=(1.0,)))
    assert not nothing.improved
    for node in _layers(same).values():
        w_same, w_ref = _weight_of(same, node), _weight_of(reference, _layers(reference)[node.name])
        assert w_same is not None and w_ref is not None
        assert torch.equal(w_same.integers, w_ref.integers) and torch.equal(w_same.scale, w_ref.scale)


def test_quantized_biases_keep_their_grid():
    """QNN quantizes biases on input scale x weight scale: those layers' scales stay, their rounding is fitted."""
    _, data, _, reference, float_graph = _setup("qualcomm-sm8650", "16a4w")
    scales = {name: _weight_of(reference, node).scale.clone() for name, node in _layers(reference).items()}  # type: ignore[union-attr]
    assert scales
    fitted = copy.deepcopy(reference)
    result = fit_rounding(fitted, float_graph, (data[:32],), RoundingConfig(iterations=150, batch=16))
    for name, node in _layers(fitted).items():
        assert torch.equal(_weight_of(fitted, node).scale, scales[name]), name  # type: ignore[union-attr]
        assert result.layers[name]["rescaled_channels"] == 0
    assert result.improved
