"""Layers come from the exported graph: any module owning a conv, linear or weight-bearing matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from recipes import batches_of, recipe_of
from torch import nn

from edgeq.graph import weight_layers
from edgeq.planning.plan import quantizable_layers
from edgeq.recipe import Recipe


class SameConv(nn.Conv2d):
    """Like timm's Conv2dSame / EfficientNet-Lite's static 'same' padding: a Conv2d subclass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride)


class Projection(nn.Module):
    """A custom module with a functional linear and its own parameters (no nn.Linear inside)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in) * 0.1)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w, self.b)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = SameConv(1, 8, 3)
        self.shared = nn.Linear(8, 8)  # used twice
        self.proj = Projection(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x)).mean(dim=(2, 3))
        h = F.relu(self.shared(F.relu(self.shared(h))))
        return self.proj(h)


def _recipe() -> Recipe:
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(64, 1, 8, 8)
    y = net(x).argmax(1)
    return recipe_of(net, batches_of(x, y, 16), "graphnet")


def test_subclassed_conv_functional_linear_and_shared_layer_are_all_found():
    recipe = _recipe()
    layers = {layer.name: layer for layer in weight_layers(recipe.model(), recipe.example_inputs())}
    assert list(layers) == ["stem", "shared", "proj"]
    assert layers["stem"].kind == "conv" and layers["stem"].params == 8 * 1 * 3 * 3
    assert layers["shared"].kind == "linear" and layers["shared"].params == 64  # one layer, counted once
    assert layers["proj"].kind == "linear" and layers["proj"].weights == ("proj.w",)
    # Without example inputs: modules by class, subclasses included (the functional one is invisible then).
    assert [layer.name for layer in quantizable_layers(recipe.model())] == ["stem", "shared"]


def test_every_graph_layer_is_analysed_planned_and_built(tmp_path):
    from edgeq.configs import BuildConfig, QATConfig
    from edgeq.pipeline import build

    recipe = _recipe()
    result = build(
        recipe, BuildConfig(out=tmp_path / "out", qat=QATConfig(steps=10), max_drop=100.0, debug_program=False)
    )
    assert [entry.name for entry in result.plan.layers] == ["stem", "shared", "proj"]
    analysed = {layer["name"]: layer for layer in result.report["analysis"]["layers"]}
    assert set(analysed) == {"stem", "shared", "proj"}
    assert analysed["proj"]["params"] == 32 and analysed["proj"]["weight_sqnr"]
    assert result.report["delegation"]["delegated_ops"] > 0
    assert result.scores.agreement["reference_vs_program"] >= 90.0


def test_a_layer_applied_twice_lowers_to_a_program_that_matches_its_reference():
    """ExecuTorch 1.5.1's XNNPACK lowering computes a reused layer's second call with the first call's
    constants (9 dB from the reference, measured); edgeq gives each call its own copy before lowering."""
    from edgeq.backends import load_target, quant_spec
    from edgeq.capture import capture
    from edgeq.checks.evaluate import sqnr_db
    from edgeq.lower import lower
    from edgeq.planning.plan import uniform_plan
    from edgeq.quant.convert import convert, prepare
    from edgeq.runtime import ProgramRunner

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(8, 8)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return F.relu(self.shared(F.relu(self.shared(h))))

    torch.manual_seed(0)
    model, h = Twice().eval(), torch.randn(16, 8)
    target = load_target("android")
    prepared = prepare(capture(model, (h[:1],)), quant_spec(uniform_plan(model, target), target, qat=False))
    prepared(h)
    reference = convert(prepared)
    program = ProgramRunner(lower(reference, (h[:1],), target).program)
    assert sqnr_db(reference(h), program(h)) > 40
