"""Empirical bias correction of a converted graph, and the build's choice between its candidates."""

from __future__ import annotations

import copy

import torch
from recipes import recipe_of
from torch import nn

from edgeq import capture, upstream
from edgeq.backends import load_target, quant_spec
from edgeq.configs import QATConfig
from edgeq.planning.plan import uniform_plan
from edgeq.quant.bias_correction import correct_bias
from edgeq.quant.ptq import post_training_quantize
from edgeq.recipe import Recipe


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # no bias: correction must add one
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(x.mean((2, 3)))


def _recipe(data: torch.Tensor) -> Recipe:
    torch.manual_seed(0)
    model = Net().eval()
    return recipe_of(model, [(data, torch.zeros(len(data), dtype=torch.long))], "bias")


def _outputs(graph, data, names):
    found = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names:
                found[n.name] = out
            return out

    Record(graph).run(data)
    return found


def test_correction_brings_every_layers_channel_means_back_to_float():
    upstream.apply()
    torch.manual_seed(1)
    data = torch.randn(32, 3, 8, 8) + 0.5
    recipe = _recipe(data)
    model = recipe.model()
    target = load_target("android")
    plan = uniform_plan(model, target, "int8", example_inputs=(data[:1],))
    reference = post_training_quantize(model, recipe, quant_spec(plan, target, qat=False), QATConfig(), batches=1)
    float_graph = capture.capture_for_quantization(model, (data[:1],), True)
    corrected = copy.deepcopy(reference)
    result = correct_bias(corrected, float_graph, (data,))
    names = set(result.shifts)
    assert len(names) == 3  # two convs and the linear
    floats, before, after = (_outputs(g, data, names) for g in (float_graph, reference, corrected))
    for name in names:
        dims = [0, 2, 3] if floats[name].dim() == 4 else [0]
        shift_before = (floats[name].mean(dims) - before[name].mean(dims)).abs().max()
        shift_after = (floats[name].mean(dims) - after[name].mean(dims)).abs().max()
        assert shift_after <= 1e-4 + 0.05 * shift_before, (name, shift_before, shift_after)
    with torch.no_grad():  # and the corrected graph still runs as a graph
        assert corrected(data).shape == (32, 4)
