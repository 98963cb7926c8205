"""Asymmetric 4-bit groups on kernels that only take symmetric ones: the zero points as a second linear.

An asymmetric group grid (a step ``s`` and a zero point ``z`` per group of ``g``
input columns, ``w = s * (q - z)``; llama.cpp's Q4_1, GPTQ's and AWQ's usual
grid) uses all 16 levels on a group whose weights are not centred on zero,
where a symmetric one (``w = s * q``) wastes part of its range. XNNPACK's 4-bit
kernels (qb4w, ExecuTorch's 8da4w) hold no zero points: its lowering drops
them. Since ``s * (q - z) = s * q - s * z`` and ``s * z`` is constant over a
group, the layer splits exactly:

    y = x (s q)^T + S(x) O^T,   S(x): the sums of x over each group of g columns,
                                O[o, k] = -s[o, k] z[o, k]

``s q`` is a symmetric 4-bit group linear XNNPACK runs as it is; ``O`` is a
small linear (``in / g`` inputs) kept at 8 bits per channel with 8-bit dynamic
activations: a byte per group and a scale per row, 0.25 bits per weight at
groups of 32. The only change from the asymmetric grid is the 8-bit rounding
of ``O`` and of the group sums.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ZeroPointLinear", "split_zero_points", "zero_point_bytes"]


class ZeroPointLinear(nn.Module):
    """A 4-bit group linear with symmetric integers (``main``) plus its zero points' share of the
    output (``offsets``, applied to the sums of the input over each group of ``group`` columns)."""

    def __init__(self, main: nn.Linear, offsets: nn.Linear, group: int) -> None:
        super().__init__()
        self.main, self.offsets, self.group = main, offsets, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the group sums as a mean over the innermost dims of a 4-D view (the offsets' weights carry
        # the factor ``group``): XNNPACK runs that as a global average pool, inside the delegate,
        # where a sum would fall back to a portable kernel between two delegate calls
        groups = x.shape[-1] // self.group
        means = x.reshape(-1, groups, self.group, 1).mean(dim=(2, 3), keepdim=True)
        return self.main(x) + self.offsets(means.reshape(*x.shape[:-1], groups))


def zero_point_bytes(params: int, rows: int, group: int) -> float:
    """What the offsets add to a linear's bytes: one 8-bit weight per group and a scale per row."""
    return params / group + 4.0 * rows


def _split(linear: nn.Linear, offsets_config: Any) -> nn.Module:
    """``linear`` (torchao's asymmetric group-quantized weight) as a ZeroPointLinear, or itself when
    its weight has no zero point to carry."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    weight = linear.weight
    if not isinstance(weight, IntxUnpackedToInt8Tensor) or weight.target_dtype == torch.int8:
        return linear
    rows, columns = weight.qdata.shape
    scale = weight.scale.reshape(rows, -1)
    zero = weight.zero_point.reshape(rows, -1).float()
    if not bool(zero.any()):
        return linear
    group = columns // scale.shape[1]
    offsets = nn.Linear(scale.shape[1], rows, bias=False)
    with torch.no_grad():
        # XNNPACK keeps group scales in bfloat16: the offsets use the steps the main part will run
        held = weight.scale.to(torch.bfloat16).to(weight.scale.dtype)
        weight.scale.copy_(held)
        offsets.weight.copy_(-held.reshape(rows, -1).float() * zero * group)
        weight.zero_point.zero_()
    from torchao.quantization.quant_api import quantize_

    quantize_(offsets, offsets_config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    return ZeroPointLinear(linear, offsets, group)


def split_zero_points(module: nn.Module, offsets_config: Any) -> nn.Module:
    """``module`` with every asymmetric 4-bit group linear split into a ZeroPointLinear whose offsets
    are quantized with ``offsets_config`` (a torchao config: the program's 8-bit dynamic linear),
    in place; returns the module, or its replacement when ``module`` itself is such a linear. Run
    it after GPTQ, which fits the integers to the asymmetric grid."""
    if isinstance(module, nn.Linear):
        return _split(module, offsets_config)
    for name, child in list(module.named_children()):
        if isinstance(child, ZeroPointLinear):
            continue
        replaced = split_zero_points(child, offsets_config)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def has_zero_points(module: Any) -> bool:
    """Whether ``module`` holds a ZeroPointLinear (for tests and reports)."""
    return any(isinstance(m, ZeroPointLinear) for m in module.modules())
