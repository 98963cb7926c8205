"""GPTQ on the program's own grid: each quantized linear's integers chosen to keep its output.

Round-to-nearest gives every weight its nearest grid point on its own. GPTQ
(Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023, Algorithm 1) rounds the input columns one
after another and moves the error each rounding makes onto the columns not yet
rounded, weighted by the inverse Hessian ``(X^T X)^-1`` of the layer's inputs on
calibration text, so the layer's output ``X W^T`` changes least.

edgeq runs it *after* torchao has quantized the layer (``quantize_`` with the
very config the program uses, e.g. ``Int8DynamicActivationIntxWeightConfig``
for XNNPACK's 8da4w): the scales (torchao's, HQQ-searched for 4-bit groups)
stay as they are and only the integers (``qdata``) are replaced, so export and
lowering read the GPTQ integers through the same tensor subclass and the
program runs exactly them (group scales are rounded to the bfloat16 XNNPACK keeps them in
first). Columns go in decreasing Hessian diagonal
("act order"); the group scales are fixed beforehand ("static groups"), so
the order needs no regrouping.

torchao's own ``torchao.prototype.gptq`` targets its Int4/Int8 weight-only and
NVFP4 tensors (GPU kernels), not the 8da4w tensor XNNPACK runs, hence this
module; the Hessians come from float activations on the recipe's training text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Hessians", "collect_hessians", "fitted_integers", "gptq_integers", "apply_gptq"]


@dataclass
class Hessians:
    """``X^T X / tokens`` of each linear's input, by the linear's name in ExecuTorch's transformer,
    and the float weight each was measured with (the model's own tensors, not copies)."""

    matrices: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    #: GPTQ's integers per (linear, scale fingerprint): the analysis and the lowering quantize the
    #: same weights with the same config, so the second asks for what the first computed
    _cache: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def __contains__(self, name: str) -> bool:
        return name in self.matrices

    def rescaled(self, scales: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> Hessians:
        """The statistics after edgeq.llm.smooth divided some linears' inputs by ``scales`` (X / s has
        the second moment H / s s^T), with ``weights``: each linear's weight now."""
        matrices = {
            name: matrix / torch.outer(scales[name], scales[name]) if name in scales else matrix
            for name, matrix in self.matrices.items()
        }
        return Hessians(matrices, {name: weights[name] for name in self.weights}, self.tokens, self.seconds)


def collect_hessians(model: Any, windows: list[list[int]], names: dict[str, str]) -> Hessians:
    """Each linear's input second moment on ``windows`` (token ids of the training text), one
    float forward per window; ``names``: the HF module name -> ExecuTorch linear name."""
    start = time.perf_counter()
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def record(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1])
            sums[name].addmm_(x.T, x)

        return record

    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module_name in names:
            handles.append(module.register_forward_pre_hook(hook(names[module_name])))
            weights[names[module_name]] = module.weight.detach()
    tokens = 0
    try:
        with torch.no_grad():
            for window in windows:
                model(input_ids=torch.tensor([window]))
                tokens += len(window)
    finally:
        for handle in handles:
            handle.remove()
    matrices = {name: total / max(tokens, 1) for name, total in sums.items()}
    return Hessians(matrices, weights, tokens, time.perf_counter() - start)


def gptq_integers(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    damping: float = 0.01,
    block: int = 128,
) -> torch.Tensor:
    """The integers of ``weight`` [out, in] on the fixed grid ``scale`` / ``zero_point`` ([out, groups]:
    groups of ``in / groups`` input columns), chosen by GPTQ against ``hessian`` [in, in]."""
    w = weight.detach().float().clone()
    rows, columns = w.shape
    group = columns // scale.shape[1]
    h = hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    # Columns' grids after the permutation: each column keeps its own group's scale.
    col_scale = scale.float().repeat_interleave(group, dim=1)[:, order]
    col_zero = zero_point.float().repeat_interleave(group, dim=1)[:, order]
    h += damping * float(torch.diagonal(h).mean()) * torch.eye(columns)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty_like(w)
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        inv1 = inverse[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            s, z = col_scale[:, i1 + i], col_zero[:, i1 + i]
            qi = torch.clamp(torch.round(col / s + z), qmin, qmax)  # z may be fractional (edgeq.llm.zero_points)
            q[:, i1 + i] = qi
            err = (col - (qi - z) * s) / inv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * inv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ inverse[i1:i2, i2:]
    result = torch.empty_like(q)
    result[:, order] = q
    return result


def _fingerprint(scale: torch.Tensor) -> int:
    return hash((tuple(scale.shape), float(scale.double().sum()), float(scale.double().square().sum())))


def apply_gptq(linear: torch.nn.Module, name: str, hessians: Hessians) -> bool:
    """Replace ``linear``'s torchao integer weights (quantized from the float weight ``hessians``
    holds for ``name``) by GPTQ's, in place; False when the layer has no Hessian or no integer
    weights (float, fp16)."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    tensor = linear.weight
    if name not in hessians or not isinstance(tensor, IntxUnpackedToInt8Tensor):
        return False
    scale = tensor.scale.reshape(tensor.qdata.shape[0], -1)
    if tensor.target_dtype != torch.int8:
        # XNNPACK stores group scales in bfloat16 (its qb4w kernels): fit the integers to the scales
        # the program will hold, not to float32 ones it rounds afterwards
        scale.copy_(scale.to(torch.bfloat16).to(scale.dtype))
    zero = tensor.zero_point.reshape(scale.shape)
    tensor.qdata.copy_(fitted_integers(hessians, name, scale, zero, _range(tensor)))
    return True


def fitted_integers(
    hessians: Hessians, name: str, scale: torch.Tensor, zero: torch.Tensor, bounds: tuple[int, int]
) -> torch.Tensor:
    """GPTQ's int8-held integers for ``name``'s float weight on the grid ``scale`` / ``zero`` ([out,
    groups]; ``zero`` may be fractional) within ``bounds``, computed once per grid: the analysis and
    the lowering ask for the same layer on the same grid."""
    key = (name, _fingerprint(scale), _fingerprint(zero))
    integers = hessians._cache.get(key)
    if integers is None:
        integers = gptq_integers(hessians.weights[name], hessians.matrices[name], scale, zero, *bounds)
        hessians._cache[key] = integers = integers.to(torch.int8)
    return integers


def _range(tensor: Any) -> tuple[int, int]:
    """The integer range of a torchao intx tensor (int4 held in int8: -8..7)."""
    dtype = tensor.target_dtype
    if dtype == torch.int8:
        return -128, 127
    bits = int(str(dtype).removeprefix("torch.int"))
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
