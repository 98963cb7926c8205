"""Choose one precision per layer from the target's menu (spec claim 9).

Greedy on measured sensitivity: start every layer at the target's default
precision, keep outlier-heavy layers there, then narrow the layer that costs
the least predicted metric per byte saved, while the prediction stays within
``max_drop`` (or until the program fits ``size_budget``). If even the default
costs more than ``max_drop``, the most sensitive layers go back to float
where the target offers it. Every layer gets a one-line reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeq.errors import EdgeqError
from edgeq.planning.analysis import Analysis, LayerAnalysis
from edgeq.planning.plan import LayerPlan, Plan, budget_in_bytes, layer_bytes
from edgeq.targets import Target

#: max |x| over the 99.9th percentile of |x| above which an input is outlier-heavy
OUTLIER_RATIO = 8.0
#: largest over median channel absmax above which a weight is outlier-heavy
CHANNEL_SPREAD = 20.0


@dataclass
class PlanPoint:
    """One plan the greedy search passed through, for the accuracy-vs-size plot."""

    program_bytes: int
    predicted_drop: float
    precisions: dict[str, str]
    chosen: bool = False


@dataclass
class Planned:
    plan: Plan
    predicted_drop: float
    program_bytes: int
    considered: list[PlanPoint] = field(default_factory=list)


def _drop(layer: LayerAnalysis, precision: str) -> float:
    return max(0.0, layer.metric_drop.get(precision, 0.0))


def _options(layer: LayerAnalysis, target: Target) -> list[str]:
    # A precision the analysis did not score for this layer (groups that do not divide its
    # input channels) is not an option; the default and float always are.
    return [
        name
        for name, p in target.precisions.items()
        if layer.kind in p.ops
        and (name == target.default_precision or p.is_float or name in layer.metric_drop or not layer.metric_drop)
    ]


def _outlier(layer: LayerAnalysis, outlier_ratio: float, channel_spread: float) -> str:
    if layer.outlier_ratio > outlier_ratio:
        return f"outlier-heavy input (max |x| / p99.9 = {layer.outlier_ratio:.1f} > {outlier_ratio:g})"
    if layer.channel_spread > channel_spread:
        return f"outlier weight channel (max / median channel range = {layer.channel_spread:.1f} > {channel_spread:g})"
    return ""


def make_plan(
    analysis: Analysis,
    target: Target,
    float_program_bytes: int,
    max_drop: float = 1.0,
    size_budget: float | None = None,
    outlier_ratio: float = OUTLIER_RATIO,
    channel_spread: float = CHANNEL_SPREAD,
    intermediate_bits: int = 8,
    program_overhead: float | None = None,
) -> Planned:
    """The smallest plan predicted within ``max_drop``, or the best that fits ``size_budget``.

    ``size_budget`` is bytes (> 1) or a fraction of the float program (<= 1).
    """
    layers = analysis.layers
    float_weight_bytes = sum(4.0 * l.params for l in layers)
    # Program bytes beyond the weights: the float program's by default; a backend whose programs
    # carry overhead of their own (an HTP context binary) passes what it measured.
    overhead = max(0.0, float_program_bytes - float_weight_bytes) if program_overhead is None else program_overhead
    budget = None if size_budget is None else budget_in_bytes(size_budget, float_program_bytes)

    def layer_size(l: LayerAnalysis, precision: str) -> float:
        return layer_bytes(l.params, len(l.channel_absmax), l.kind, target.precisions[precision])

    def size(choice: dict[str, str]) -> int:
        return int(overhead + sum(layer_size(l, choice[l.name]) for l in layers))

    def drop(choice: dict[str, str]) -> float:
        return sum(_drop(l, choice[l.name]) for l in layers if not target.precisions[choice[l.name]].is_float)

    default = target.default_precision
    choice: dict[str, str] = {}
    reason: dict[str, str] = {}
    locked: set[str] = set()
    for l in layers:
        opts = _options(l, target)
        choice[l.name] = default if default in opts else max(opts, key=lambda p: target.precisions[p].weight_bytes)
        reason[l.name] = f"{choice[l.name]}: target default"
        why = _outlier(l, outlier_ratio, channel_spread)
        if why:
            locked.add(l.name)
            reason[l.name] = f"{choice[l.name]}: kept wide, {why}"
    # A precision as small as the default that is predicted to hurt less (dynamic int8 where
    # static int8 ranges are outlier-bound) replaces it before any narrowing.
    for l in layers:
        if l.name in locked:
            continue
        here = target.precisions[choice[l.name]]
        same = [
            p
            for p in _options(l, target)
            if target.precisions[p].weight_bytes == here.weight_bytes
            and not target.precisions[p].is_float
            and p in l.metric_drop
        ]
        best_same = min(same, key=lambda p: _drop(l, p), default=choice[l.name])
        if _drop(l, best_same) < _drop(l, choice[l.name]):
            reason[l.name] = (
                f"{best_same}: as small as {choice[l.name]}, predicted {_drop(l, best_same):.2f} points "
                f"instead of {_drop(l, choice[l.name]):.2f}"
            )
            choice[l.name] = best_same
    considered = [PlanPoint(size(choice), drop(choice), dict(choice))]

    # Too damaging even at the default: send the most sensitive layers to float. Only on
    # sensitivities scored on every analysis batch: a time-budgeted share of a few dozen samples
    # flips a prediction or two per layer, which would send sound layers to float; the build's
    # measured fallback (after quantization, on the evaluation data) handles those models.
    floatable = [l for l in layers if any(target.precisions[p].is_float for p in _options(l, target))]
    while drop(choice) > max_drop and budget is None and analysis.full_sensitivity:
        worst = max(
            (l for l in floatable if not target.precisions[choice[l.name]].is_float),
            key=lambda l: _drop(l, choice[l.name]),
            default=None,
        )
        if worst is None or _drop(worst, choice[worst.name]) == 0:
            break
        cost = _drop(worst, choice[worst.name])
        choice[worst.name] = target.narrowest_float(worst.kind, max(abs(worst.act_min), abs(worst.act_max)))
        reason[worst.name] = (
            f"{choice[worst.name]}: quantizing it alone is predicted to cost {cost:.2f} points, over --max-drop"
        )
        locked.add(worst.name)
        considered.append(PlanPoint(size(choice), drop(choice), dict(choice)))

    while True:
        current_size, current_drop = size(choice), drop(choice)
        if budget is not None and current_size <= budget:
            break
        best = None
        for l in layers:
            if l.name in locked:
                continue
            for p in _options(l, target):
                spec = target.precisions[p]
                saved = layer_size(l, choice[l.name]) - layer_size(l, p)
                if spec.is_float or saved <= 0:
                    continue
                cost = _drop(l, p) - _drop(l, choice[l.name])
                if budget is None and current_drop + cost > max_drop:
                    continue
                key = (cost / saved, -saved)
                if best is None or key < best[0]:
                    best = (key, l, p, saved, cost)
        if best is None:
            break
        _, l, p, saved, cost = best
        choice[l.name] = p
        reason[l.name] = (
            f"{p}: saves {saved:,.0f} bytes for a predicted {cost:+.2f} points "
            f"(Δloss {l.loss_delta.get(p, 0.0):+.4f} with this layer alone quantized)"
        )
        considered.append(PlanPoint(size(choice), drop(choice), dict(choice)))

    final_size = size(choice)
    if budget is not None and final_size > budget:
        raise EdgeqError(
            f"no plan fits --size-budget {budget:,.0f} bytes on {target.name}: "
            f"the smallest reaches {final_size:,} bytes",
            "raise --size-budget, or pick a target with narrower precisions",
        )
    for l in layers:
        if l.name in locked or reason[l.name].startswith(
            (choice[l.name] + ": saves", choice[l.name] + ": as small as")
        ):
            continue
        narrower = [
            p
            for p in _options(l, target)
            if target.precisions[p].weight_bytes < target.precisions[choice[l.name]].weight_bytes
            and not target.precisions[p].is_float
        ]
        if not narrower:
            reason[l.name] = (
                f"{choice[l.name]}: no narrower precision saves bytes for a {l.kind} layer on {target.name}"
            )
        elif budget is None:
            cheapest = min(narrower, key=lambda p: _drop(l, p))
            reason[l.name] = (
                f"{choice[l.name]}: {cheapest} would push the predicted drop to "
                f"{drop(choice) + _drop(l, cheapest) - _drop(l, choice[l.name]):.2f} points, "
                f"over --max-drop {max_drop:g}"
            )
        else:
            reason[l.name] = f"{choice[l.name]}: the budget was met without narrowing it"
    considered[-1].chosen = True
    plan = Plan(
        target=target.name,
        layers=[
            LayerPlan(l.name, l.kind, choice[l.name], reason[l.name], l.params, len(l.channel_absmax)) for l in layers
        ],
        intermediate_bits=intermediate_bits,
    )
    return Planned(plan=plan, predicted_drop=drop(choice), program_bytes=final_size, considered=considered)
