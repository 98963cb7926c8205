"""ExecuTorch's RMSNorm in a form XNNPACK keeps inside its delegate.

ExecuTorch's transformer normalises with ``x * rsqrt(mean(x * x, -1) + eps)``.
XNNPACK runs a mean only over the inner dims of a 4-D tensor, so that mean
runs as a portable kernel between two delegate calls, twice per block: the
program goes in and out of XNNPACK around every norm, and each piece is
lowered (and planned, serialized, loaded) on its own. The same mean as a
linear with one output (weights ``1 / dim``) is an XNNPACK op of any rank, and
the norm then stays in the delegate with the linears around it. The numbers
differ only in the order of the sum's float additions.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LinearMeanRMSNorm", "replace_rms_norms"]


class LinearMeanRMSNorm(nn.Module):
    """RMSNorm over the last dim, its mean of squares computed as a linear."""

    averaging: torch.Tensor

    def __init__(self, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        dim = weight.shape[-1]
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.eps, self.unit_offset = eps, unit_offset
        self.register_buffer("averaging", torch.full((1, dim), 1.0 / dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float()
        normed = (wide * torch.rsqrt(nn.functional.linear(wide * wide, self.averaging) + self.eps)).type_as(x)
        scale = (1.0 + self.weight.float()) if self.unit_offset else self.weight
        return normed * scale.type_as(x)


def replace_rms_norms(module: nn.Module) -> int:
    """Each of ExecuTorch's RMSNorm modules in ``module`` swapped in place for a LinearMeanRMSNorm
    with its weight and eps; returns how many."""
    from executorch.examples.models.llama.norm import RMSNorm

    swaps = [(name, m) for name, m in module.named_modules() if type(m) is RMSNorm]
    for name, norm in swaps:
        unit_offset = bool(getattr(norm, "add_unit_offset", False))
        module.set_submodule(name, LinearMeanRMSNorm(norm.weight, norm.eps, unit_offset))
    return len(swaps)
