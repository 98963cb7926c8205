"""Cross-layer equalization of the float model (Nagel et al., "Data-Free Quantization Through
Weight Equalization and Bias Correction", ICCV 2019).

For two convolutions in a row, A then B, with only scale-equivariant operations
between them (BatchNorm, ReLU, nothing), scaling A's output channel ``i`` by
``1/s_i`` and B's input channel ``i`` by ``s_i`` leaves the network's function
unchanged. With ``s_i = sqrt(r_A,i / r_B,i)`` (``r``: the channel's largest
absolute weight, BatchNorm folded into A) both channels end with the same
range, which is what per-tensor weight grids need; depthwise-separable nets,
whose depthwise channels differ by orders of magnitude, gain the most there.

The change is made on the module's own parameters (A's weight and bias, or its
BatchNorm's affine parameters; B's weight), on a copy: what follows captures,
calibrates and converts it like any float model. Pairs are found on the
exported graph, so any module structure works.

ReLU6 (``hardtanh(0, 6)``) is not scale-equivariant: a pair with it in between
is left as it is and counted, so the report says how much of a model this
method could reach.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import fx, nn

__all__ = ["EqualizationResult", "equalize"]

_CONV = "aten.conv2d."
_BATCH_NORM = ("aten._native_batch_norm_legit_no_training.", "aten.batch_norm.")
_EQUIVARIANT = ("aten.relu.", "aten.relu_.", "aten.dropout.", "aten.clone.")
_PADS = ("aten.pad.", "aten.constant_pad_nd.")
_CLAMPS = ("aten.hardtanh.", "aten.hardtanh_.", "aten.relu6.", "aten.clamp.")


@dataclass
class EqualizationResult:
    #: "A -> B" (module names) -> the wider channel-range spread of A's outputs and B's inputs, before and after
    pairs: dict[str, dict[str, float]] = field(default_factory=dict)
    #: consecutive convolutions left alone because a clamp (ReLU6) sits between them
    blocked_by_clamp: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.pairs)


@dataclass
class _Pair:
    first: nn.Conv2d
    norm: nn.BatchNorm2d | None
    second: nn.Conv2d
    label: str


def equalize(model: nn.Module, example_inputs: tuple, iterations: int = 4) -> tuple[nn.Module, EqualizationResult]:
    """An equalized copy of ``model`` (eval mode) and what changed. ``iterations`` passes over
    the pairs let chains (A -> B -> C) settle, as the paper iterates them."""
    model = copy.deepcopy(model).eval()
    result = EqualizationResult()
    pairs = _pairs(model, example_inputs, result)
    if not pairs:
        return model, result
    before = {p.label: _pair_spread(p) for p in pairs}
    with torch.no_grad():
        for _ in range(iterations):
            for pair in pairs:
                _equalize_pair(pair)
    for pair in pairs:
        result.pairs[pair.label] = {"spread_before": before[pair.label], "spread_after": _pair_spread(pair)}
    return model, result


def _spread(ranges: torch.Tensor) -> float:
    """Largest over smallest channel range (1: equal)."""
    return float(ranges.max() / ranges.clamp_min(1e-12).min())


def _pair_spread(pair: _Pair) -> float:
    """The wider spread of the two sides a pair's channels meet on (A's outputs, B's inputs)."""
    return max(_spread(_output_ranges(pair)), _spread(_input_ranges(pair.second)))


def _pairs(model: nn.Module, example_inputs: tuple, result: EqualizationResult) -> list[_Pair]:
    with torch.no_grad():
        program = torch.export.export(model, example_inputs)
    signature = program.graph_signature.inputs_to_parameters
    buffers = program.graph_signature.inputs_to_buffers
    modules = dict(model.named_modules())

    def owner(node: object) -> nn.Module | None:
        if not isinstance(node, fx.Node):
            return None
        name = signature.get(node.name) or buffers.get(node.name)
        return modules.get(name.rsplit(".", 1)[0]) if name and "." in name else None

    pairs: list[_Pair] = []
    for node in program.graph.nodes:
        if not _is(node, _CONV):
            continue
        first = owner(node.args[1])
        if not isinstance(first, nn.Conv2d):  # any conv: its output channels scale independently
            continue
        norm, current, clamped = None, node, False
        while len(current.users) == 1:
            user = next(iter(current.users))
            if _is(user, _BATCH_NORM) and norm is None and current is node:
                candidate = owner(user.args[1])
                if not isinstance(candidate, nn.BatchNorm2d) or not candidate.affine:
                    break
                norm = candidate
            elif user.op == "call_function" and "getitem" in str(user.target):
                pass  # batch norm's (output, mean, var) tuple
            elif _is(user, _EQUIVARIANT) or (_is(user, _PADS) and _zero_padding(user)):
                pass
            elif _is(user, _CLAMPS):
                clamped = True
            elif _is(user, _CONV):
                second = owner(user.args[1])
                if clamped:
                    result.blocked_by_clamp += 1
                elif isinstance(second, nn.Conv2d) and user.args[0] is current and _fits(first, second):
                    pairs.append(_Pair(first, norm, second, f"{_name(modules, first)} -> {_name(modules, second)}"))
                break
            else:
                break
            current = user
    return pairs


def _is(node: fx.Node, prefixes: tuple[str, ...] | str) -> bool:
    return node.op == "call_function" and str(node.target).startswith(prefixes)


def _zero_padding(node: fx.Node) -> bool:
    """Padding with zeros commutes with scaling; reflection does too, any other constant does not."""
    args = list(node.args) + [None] * 4
    mode = node.kwargs.get("mode", args[2] if str(node.target).startswith("aten.pad.") else "constant")
    value = node.kwargs.get("value", args[3] if str(node.target).startswith("aten.pad.") else args[2])
    return mode in ("reflect", "replicate", "circular") or (mode in (None, "constant") and not value)


def _fits(first: nn.Conv2d, second: nn.Conv2d) -> bool:
    channels = first.out_channels
    if second.groups == 1:
        return second.in_channels == channels
    # depthwise: input channel i is output channel i
    return second.groups == channels == second.in_channels == second.out_channels


def _name(modules: dict[str, nn.Module], module: nn.Module) -> str:
    return next(name for name, m in modules.items() if m is module)


def _output_ranges(pair: _Pair) -> torch.Tensor:
    weight = pair.first.weight.detach()
    ranges = weight.abs().flatten(1).amax(1)
    if pair.norm is not None:
        norm = pair.norm
        assert norm.running_var is not None and norm.weight is not None
        ranges = ranges * (norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)).abs()
    return ranges


def _input_ranges(second: nn.Conv2d) -> torch.Tensor:
    weight = second.weight.detach()
    if second.groups == 1:
        return weight.abs().transpose(0, 1).flatten(1).amax(1)
    return weight.abs().flatten(1).amax(1)


def _equalize_pair(pair: _Pair) -> None:
    r1, r2 = _output_ranges(pair), _input_ranges(pair.second)
    usable = (r1 > 0) & (r2 > 0)
    scale = torch.where(usable, torch.sqrt(r1 / r2.clamp_min(1e-12)), torch.ones_like(r1))
    shape = (-1,) + (1,) * (pair.first.weight.dim() - 1)
    if pair.norm is not None:
        # BatchNorm's output channel is gamma * x_hat + beta: scaling both scales the channel.
        assert pair.norm.weight is not None and pair.norm.bias is not None
        pair.norm.weight.div_(scale)
        pair.norm.bias.div_(scale)
    else:
        pair.first.weight.div_(scale.view(shape))
        if pair.first.bias is not None:
            pair.first.bias.div_(scale)
    if pair.second.groups == 1:
        pair.second.weight.mul_(scale.view(1, -1, *([1] * (pair.second.weight.dim() - 2))))
    else:
        pair.second.weight.mul_(scale.view(shape))
