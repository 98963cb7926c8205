"""Asymmetric 4-bit groups on kernels that only take symmetric ones: the zero points as a second linear.

An asymmetric group grid (a step ``s`` and a zero point ``z`` per group of ``g``
input columns, ``w = s * (q - z)``; llama.cpp's Q4_1, GPTQ's and AWQ's usual
grid) spends all 16 levels between a group's own minimum and maximum, where a
symmetric one (``w = s * q``) spans ``[-max|w|, max|w|]`` and wastes part of it
on a group that is not centred on zero. XNNPACK's 4-bit kernels (qb4w,
ExecuTorch's 8da4w) hold no zero points: its lowering drops them. Since
``s * (q - z) = s * q - s * z`` and ``s * z`` is constant over a group, the
layer splits exactly:

    y = x (s q)^T + S(x) O^T,   S(x): the sums of x over each group of g columns,
                                O[o, k] = -s[o, k] z[o, k]

``s q`` is a symmetric 4-bit group linear XNNPACK runs as it is; ``O`` is a
small linear (``in / g`` inputs) kept at 8 bits per channel with 8-bit dynamic
activations: a byte per group and a scale per row, 0.25 bits per weight at
groups of 32. Because ``z`` is only ever stored inside ``O``, it need not be an
integer, so the grid is each group's own min-max in 16 levels, as Q4_1's is.
What differs from that grid is the 8-bit rounding of ``O`` and of the group
sums, and the steps' bfloat16.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from edgeq.llm.gptq import Hessians, fitted_integers

__all__ = [
    "ZeroPointLinear", "asymmetric_grid", "group_means", "zero_point_bytes", "zero_point_linear", "zero_points_fit"
]  # fmt: skip


class ZeroPointLinear(nn.Module):
    """A 4-bit group linear with symmetric integers (``main``) plus its zero points' share of the
    output (``offsets``, applied to the sums of the input over each group of ``group`` columns)."""

    main: nn.Module
    offsets: nn.Module
    group: int

    def __init__(self, main: nn.Module, offsets: nn.Module, group: int) -> None:
        super().__init__()
        self.main, self.offsets, self.group = main, offsets, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.offsets(group_means(x, self.group))


def group_means(x: torch.Tensor, group: int) -> torch.Tensor:
    """The means of ``x`` over each group of ``group`` columns ([..., in] -> [..., in / group]).

    Shaped for XNNPACK, so the whole layer stays in one delegate call: a mean over the inner dims
    of a 4-D view with one channel (its global average pooling, whose NHWC layout is then the
    tensor's own, no transpose), and reshapes whose sizes are integers with at most one -1
    (XNNPACK takes no reshape to a symbolic size, such as a dynamic prompt length)."""
    groups = x.shape[-1] // group
    means = x.reshape(-1, 1, group, 1).mean(dim=(2, 3), keepdim=True)
    return means.reshape(*x.shape[:-2], -1, groups)


def zero_points_fit(in_features: int, group: int) -> bool:
    """Whether a linear reading ``in_features`` takes zero points in groups of ``group``: at least two
    groups a row (with one, the offsets linear would read a single input, which torchao's 8-bit
    dynamic config refuses)."""
    return in_features % group == 0 and in_features // group >= 2


def zero_point_bytes(params: int, rows: int, group: int) -> float:
    """What the offsets add to a linear's bytes: one 8-bit weight per group and a scale per row."""
    return params / group + 4.0 * rows


def asymmetric_grid(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's step and zero point ([out, in / group]) spanning its own minimum to maximum in
    16 levels (integers -8..7). The zero point is fractional, unlike torchao's asymmetric grids,
    which put 0.0 exactly on the grid and so cannot hold a group that a GGUF Q4_1 file (a float
    minimum and a step) holds; here it is never stored as an integer, only as the offsets. Steps
    are rounded to bfloat16, as XNNPACK holds them."""
    rows, columns = weight.shape
    grouped = weight.detach().float().reshape(rows, columns // group, group)
    low, high = grouped.amin(-1), grouped.amax(-1)
    step = ((high - low) / 15).clamp(min=1e-8).to(torch.bfloat16).float()
    return step, -low / step - 8


def zero_point_linear(
    linear: nn.Module,
    group: int,
    configs: tuple[Any, Any],
    hessians: Hessians | None = None,
    name: str = "",
) -> ZeroPointLinear:
    """``linear`` on its asymmetric 4-bit grid (:func:`asymmetric_grid`), integers rounded to nearest
    or, when ``hessians`` has ``name``, fitted by GPTQ; split into XNNPACK's symmetric 8da4w linear
    (torchao's tensor made with ``configs[0]``, its integers and steps replaced) and the 8-bit
    offsets (``configs[1]``): the program's own torchao configs (edgeq.llm.export.linear_config)."""
    from torchao.quantization.quant_api import quantize_

    weight = torch.as_tensor(linear.weight).detach().float()
    step, zero = asymmetric_grid(weight, group)
    if hessians is not None and name in hessians:
        integers = fitted_integers(hessians, name, step, zero, (-8, 7))
    else:
        columns = weight.reshape(weight.shape[0], -1, group)
        integers = torch.round(columns / step.unsqueeze(-1) + zero.unsqueeze(-1)).clamp(-8, 7).reshape(weight.shape)
    main = copy.deepcopy(linear)
    quantize_(main, configs[0], filter_fn=lambda m, fqn: fqn == "")
    held: Any = main.weight  # torchao's IntxUnpackedToInt8Tensor
    with torch.no_grad():
        held.qdata.copy_(integers.to(held.qdata.dtype))
        held.scale.copy_(step.reshape(held.scale.shape).to(held.scale.dtype))
        held.zero_point.zero_()
    offsets = nn.Linear(step.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        offsets.weight.copy_(-step * zero * group)  # the group mean times group is the group sum
    quantize_(offsets, configs[1], filter_fn=lambda m, fqn: fqn == "")
    return ZeroPointLinear(main, offsets, group)
