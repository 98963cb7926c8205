"""Activation clipping search: each calibrated activation's range chosen by its quantization error.

XNNPACK's PTQ observer (torchao's ``HistogramObserver``) keeps a 2048-bin
histogram of every activation and narrows its range greedily, one quantile step
at a time, stopping at the first step that does not lower its estimate of the
L2 error. That walk can stop in a local minimum, and it moves one end at a time.

This search reads the same histogram and tries every pair of range ends the
histogram can express (lower end at or below zero, upper end at or above it,
as every asymmetric int8 grid must hold zero), with the error of each in closed
form: values outside the range are clipped to its end (squared distance), values
inside round to a step of ``(hi - lo) / levels`` (a step squared over 12). Prefix
sums make that a few vector operations per tensor. The observer's own choice is
one of the candidates, so the search never picks a range the histogram rates
worse. The chosen range replaces the observer (a min/max observer holding it)
before conversion: observers that quantization specs share stay shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx
from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver

__all__ = ["ClippingResult", "search_clipping"]

#: candidate range ends per side (the histogram's 2048 bin edges thinned to this many)
_ENDS = 256


@dataclass
class ClippingResult:
    #: observer name -> the histogram's error estimate with the observer's range and with the searched one
    tensors: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return any(row["after"] < row["before"] for row in self.tensors.values())

    def summary(self) -> dict[str, float]:
        rows = list(self.tensors.values())
        before = sum(r["before"] for r in rows)
        after = sum(r["after"] for r in rows)
        return {
            "tensors": len(rows),
            "narrowed": sum(1 for r in rows if r["after"] < r["before"]),
            "error_ratio": after / before if before else 1.0,
        }


def search_clipping(prepared: fx.GraphModule) -> ClippingResult:
    """Replace every calibrated histogram observer of ``prepared`` (in place) by the range with
    the least estimated quantization error."""
    result = ClippingResult()
    names: dict[int, list[str]] = {}
    observers: dict[int, HistogramObserver] = {}
    for name, module in prepared.named_modules(remove_duplicate=False):
        if isinstance(module, HistogramObserver):
            names.setdefault(id(module), []).append(name)
            observers[id(module)] = module
    for key, observer in observers.items():
        found = _search(observer)
        if found is None:
            continue
        lo, hi, before, after = found
        result.tensors[names[key][0]] = {"before": before, "after": after, "lo": lo, "hi": hi}
        if after >= before:
            continue
        replacement = MinMaxObserver(
            dtype=observer.dtype,
            qscheme=observer.qscheme,
            quant_min=observer.quant_min,
            quant_max=observer.quant_max,
            eps=float(observer.eps),
        ).to(observer.min_val.device)
        replacement.min_val.fill_(lo)
        replacement.max_val.fill_(hi)
        for name in names[key]:
            parent, _, attribute = name.rpartition(".")
            setattr(prepared.get_submodule(parent) if parent else prepared, attribute, replacement)
    return result


def _search(observer: HistogramObserver) -> tuple[float, float, float, float] | None:
    """(lo, hi, error with the observer's own range, error with (lo, hi)) or None when it saw nothing."""
    histogram = observer.histogram.detach().double().cpu()
    low, high = float(observer.min_val), float(observer.max_val)
    if not histogram.sum() > 0 or not high > low:
        return None
    bins = histogram.numel()
    width = (high - low) / bins
    centers = low + width * (torch.arange(bins, dtype=torch.float64) + 0.5)
    edges = low + width * torch.arange(bins + 1, dtype=torch.float64)
    levels = observer.quant_max - observer.quant_min
    symmetric = observer.qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)

    scale, zero_point = (float(v) for v in observer.calculate_qparams())
    own_lo = (observer.quant_min - zero_point) * scale
    own_hi = (observer.quant_max - zero_point) * scale
    lows = _ends(edges[edges <= 0], low, own_lo, lower=True)
    highs = _ends(edges[edges >= 0], high, own_hi, lower=False)
    if symmetric:
        magnitudes = torch.unique(torch.cat([highs, -lows]).clamp_min(0))
        errors = _errors(histogram, centers, -magnitudes, magnitudes, levels, pairs=False)
        best = int(torch.argmin(errors))
        lo, hi = -float(magnitudes[best]), float(magnitudes[best])
        after = float(errors[best])
        own = max(abs(min(own_lo, 0.0)), max(own_hi, 0.0))
        before = float(_errors(histogram, centers, torch.tensor([-own]), torch.tensor([own]), levels, pairs=False)[0])
    else:
        errors = _errors(histogram, centers, lows, highs, levels, pairs=True)
        best = int(torch.argmin(errors))
        lo, hi = float(lows[best // highs.numel()]), float(highs[best % highs.numel()])
        after = float(errors.flatten()[best])
        own = torch.tensor([min(own_lo, 0.0)]), torch.tensor([max(own_hi, 0.0)])
        before = float(_errors(histogram, centers, *own, levels, pairs=False)[0])
    return lo, hi, before, after


def _ends(edges: torch.Tensor, extreme: float, own: float, lower: bool) -> torch.Tensor:
    """Candidate range ends on one side: thinned bin edges, zero, the observed extreme and the
    observer's own choice."""
    if edges.numel() > _ENDS:
        edges = edges[torch.linspace(0, edges.numel() - 1, _ENDS).round().long()]
    bound = min(extreme, 0.0) if lower else max(extreme, 0.0)
    own = min(own, 0.0) if lower else max(own, 0.0)
    return torch.unique(torch.cat([edges, torch.tensor([0.0, bound, own], dtype=torch.float64)]))


def _errors(
    histogram: torch.Tensor, centers: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor, levels: int, pairs: bool
) -> torch.Tensor:
    """Squared quantization error of the histogram's values for ranges (lo, hi): every pair of
    ``lows`` x ``highs`` when ``pairs`` (a [lows, highs] table), else lows[i] with highs[i]."""
    lows, highs = lows.double(), highs.double()
    n = histogram
    count = torch.cat([torch.zeros(1, dtype=torch.float64), n.cumsum(0)])
    first = torch.cat([torch.zeros(1, dtype=torch.float64), (n * centers).cumsum(0)])
    second = torch.cat([torch.zeros(1, dtype=torch.float64), (n * centers * centers).cumsum(0)])
    below = torch.searchsorted(centers, lows)  # bins whose centre lies below lo
    above = torch.searchsorted(centers, highs, right=True)  # bins up to hi
    total = count[-1]

    def outside_low(lo: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return second[k] - 2 * lo * first[k] + lo * lo * count[k]

    def outside_high(hi: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        c, f, s = total - count[k], first[-1] - first[k], second[-1] - second[k]
        return s - 2 * hi * f + hi * hi * c

    low_error, high_error = outside_low(lows, below), outside_high(highs, above)
    if pairs:
        inside = (count[above][None, :] - count[below][:, None]).clamp_min(0)
        step = (highs[None, :] - lows[:, None]) / levels
        return low_error[:, None] + high_error[None, :] + inside * step * step / 12.0
    inside = (count[above] - count[below]).clamp_min(0)
    step = (highs - lows) / levels
    return low_error + high_error + inside * step * step / 12.0
