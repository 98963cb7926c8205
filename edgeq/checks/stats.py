"""How sure a measured accuracy is: intervals for one model, paired tests between two.

Accuracy on a few hundred samples moves by a point or more when a handful of them
flip, so every number a report gives carries a 95% interval, and every comparison
that matters (float vs program, candidate vs candidate) is a paired test on the
same samples:

- top-1 accuracy (the default metric): the Wilson score interval for one model;
  for a pair, McNemar's exact test on the samples where exactly one of the two is
  right, and Tango's score interval of the difference (a paired bootstrap
  collapses to [0, 0] when no sample flips, as if 250 photos proved two models
  identical; the score interval keeps the width the sample size allows);
- any other metric (the recipe's own): a percentile bootstrap over samples for one
  model, a paired bootstrap (the same resampled samples for both) for a pair.

A bootstrap recomputes the recipe's metric on resampled (outputs, targets), so it
needs no knowledge of the metric, and it is seeded: the same outputs give the same
interval.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from edgeq.recipe import top1_accuracy, top1_hits
from edgeq.samples import take

__all__ = ["Interval", "Paired", "interval", "mean_interval", "paired", "paired_proportion_interval", "verdict"]

LEVEL = 0.95
RESAMPLES = 1000
#: a metric slower than this per call (COCO mAP over a few hundred images) gets fewer resamples,
#: never under MIN_RESAMPLES: the interval's seconds stay bounded, and its method says how many
BOOTSTRAP_SECONDS = 10.0
MIN_RESAMPLES = 200
_Z = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float
    samples: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Paired:
    """``a - b`` on the same samples, its interval, and the p-value of "no difference"."""

    difference: float
    low: float
    high: float
    p_value: float
    samples: int
    method: str
    #: McNemar's discordant counts (a right / b wrong, and the reverse); top-1 only
    discordant: tuple[int, int] | None = None

    @property
    def significant(self) -> bool:
        return self.p_value < 1.0 - LEVEL

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


def _is_top1(metric: Callable) -> bool:
    return getattr(metric, "__wrapped__", metric) is top1_accuracy


def wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson score interval of a proportion, in percent."""
    if n == 0:
        return 0.0, 100.0
    p = successes / n
    denominator = 1 + _Z**2 / n
    centre = (p + _Z**2 / (2 * n)) / denominator
    half = _Z * math.sqrt(p * (1 - p) / n + _Z**2 / (4 * n * n)) / denominator
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def paired_proportion_interval(only_a: int, only_b: int, n: int) -> tuple[float, float]:
    """95% score interval of p_a - p_b for two classifiers scored on the same ``n`` samples, from the
    discordant counts only (Tango, "Equivalence test and confidence interval for the difference in
    proportions for the paired-sample design", Statistics in Medicine 17, 1998), in points: every
    difference whose score statistic, with the discordance rate re-estimated under it, stays within
    the normal quantile. It covers at the nominal rate with few discordant samples, where a paired
    bootstrap (zero width when none flips) and the Wald interval do not."""
    if n == 0:
        return -100.0, 100.0
    b, c = only_a, only_b

    def score(delta: float) -> float:
        w = -b - c + (2 * n - b + c) * delta
        q = (math.sqrt(max(w * w + 8 * n * c * delta * (1 - delta), 0.0)) - w) / (4 * n)  # restricted MLE of c/n
        variance = n * (2 * q + delta * (1 - delta))
        return (b - c - n * delta) / math.sqrt(variance) if variance > 0 else math.copysign(math.inf, b - c - n * delta)

    def bound(inside: float, outside: float) -> float:
        for _ in range(60):  # the statistic is monotone in delta: bisect to its crossing of the quantile
            middle = (inside + outside) / 2
            inside, outside = (middle, outside) if abs(score(middle)) <= _Z else (inside, middle)
        return inside

    estimate = (b - c) / n
    return 100.0 * bound(estimate, -1.0), 100.0 * bound(estimate, 1.0)


def _resamples(n: int, seed: int, count: int = RESAMPLES) -> torch.Tensor:
    return torch.randint(0, n, (count, n), generator=torch.Generator().manual_seed(seed))


def _resampler(metric: Callable, outputs: torch.Tensor, targets: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The metric on each resample (a row of the indices given); prepared once when the metric
    knows how (``metric.resampler``: COCO mAP matches boxes once, mIoU computes each image's
    confusion matrix once, and each resample only re-accumulates)."""
    fast = getattr(getattr(metric, "__wrapped__", metric), "resampler", None)
    if fast is not None:
        prepared = fast(outputs, targets)
        return lambda indices: torch.as_tensor(prepared(indices), dtype=torch.float64)
    return lambda indices: torch.tensor(
        [float(metric(outputs[idx], take(targets, idx))) for idx in indices], dtype=torch.float64
    )


def _budgeted_bootstrap(
    metric: Callable, outputs: torch.Tensor, targets: Any, n: int, seed: int, seconds: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample indices and the metric on each: RESAMPLES of them, or as many as fit in
    ``seconds`` for a slow metric (timed on the first few, which are kept), never under
    MIN_RESAMPLES."""
    indices = _resamples(n, seed)
    probe = 5
    score = _resampler(metric, outputs, targets)  # its one-off preparation stays out of the timing
    start = time.perf_counter()
    first = score(indices[:probe])
    each = max((time.perf_counter() - start) / probe, 1e-9)
    indices = indices[: int(min(RESAMPLES, max(MIN_RESAMPLES, seconds / each)))]
    return indices, torch.cat([first, score(indices[probe:])])


def _percentiles(values: torch.Tensor) -> tuple[float, float]:
    tail = (1.0 - LEVEL) / 2
    ordered = values.sort().values
    last = len(ordered) - 1
    return float(ordered[int(round(tail * last))]), float(ordered[int(round((1 - tail) * last))])


def interval(
    metric: Callable, outputs: torch.Tensor, targets: Any, seed: int = 0, seconds: float | None = None
) -> Interval:
    """The metric of one model with its 95% interval over the evaluation samples; a bootstrapped
    metric's resampling spends about ``seconds`` (unset: BOOTSTRAP_SECONDS)."""
    n = int(outputs.shape[0])
    value = float(metric(outputs, targets))
    if _is_top1(metric):
        correct = int(top1_hits(outputs, targets).sum())
        low, high = wilson(correct, n)
        return Interval(value, low, high, n, "Wilson score interval")
    budget = BOOTSTRAP_SECONDS if seconds is None else seconds
    indices, values = _budgeted_bootstrap(metric, outputs, targets, n, seed, budget)
    low, high = _percentiles(values)
    return Interval(value, low, high, n, f"percentile bootstrap, {len(indices)} resamples")


def mean_interval(values: torch.Tensor, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-sample values (e.g. loss differences on the same samples) and its 95% bootstrap interval."""
    n = int(values.shape[0])
    if n == 0:
        return 0.0, -math.inf, math.inf
    means = values[_resamples(n, seed)].mean(1)
    low, high = _percentiles(means)
    return float(values.mean()), low, high


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test: the binomial test of the discordant pairs at 1/2."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired(
    metric: Callable, a: torch.Tensor, b: torch.Tensor, targets: Any, seed: int = 0, seconds: float | None = None
) -> Paired:
    """``metric(a) - metric(b)`` on the same samples, with a paired 95% interval and p-value; a
    bootstrapped metric's resampling of both spends about ``seconds`` (unset: BOOTSTRAP_SECONDS)."""
    n = int(a.shape[0])
    difference = float(metric(a, targets)) - float(metric(b, targets))
    if _is_top1(metric):
        ca, cb = top1_hits(a, targets), top1_hits(b, targets)
        only_a, only_b = int(((ca == 1) & (cb == 0)).sum()), int(((ca == 0) & (cb == 1)).sum())
        low, high = paired_proportion_interval(only_a, only_b, n)
        p = mcnemar_p(only_a, only_b)
        method = "McNemar exact test; Tango score interval"
        return Paired(difference, low, high, p, n, method, (only_a, only_b))
    budget = BOOTSTRAP_SECONDS if seconds is None else seconds
    indices, values = _budgeted_bootstrap(metric, a, targets, n, seed, budget / 2)
    diffs = values - _resampler(metric, b, targets)(indices)
    low, high = _percentiles(diffs)
    # Two-sided bootstrap p-value: how often the resampled difference falls on the other side of 0.
    if difference == 0:
        p = 1.0
    else:
        crossing = float((diffs <= 0).float().mean() if difference > 0 else (diffs >= 0).float().mean())
        p = min(1.0, 2.0 * crossing)
    return Paired(difference, low, high, p, n, f"paired bootstrap, {len(indices)} resamples")


def verdict(drop: Paired, max_drop: float) -> str:
    """What the measured drop (float - program, paired) says about --max-drop, in one sentence."""
    span = f"{drop.difference:+.2f} points [{drop.low:+.2f}, {drop.high:+.2f}] on {drop.samples} samples"
    if drop.high <= max_drop:
        where = f"within --max-drop {max_drop:g} with 95% confidence"
    elif drop.low > max_drop:
        where = f"over --max-drop {max_drop:g} with 95% confidence"
    else:
        where = f"not distinguishable from --max-drop {max_drop:g} on these samples"
    zero = "distinguishable from no drop" if drop.significant else "not distinguishable from no drop"
    return f"drop {span}: {where}; {zero} (p = {drop.p_value:.3g}, {drop.method})"
