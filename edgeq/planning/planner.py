"""Choose one precision per layer from the target's menu (spec claim 9).

Greedy on measured sensitivity: start every layer at the target's default
precision, keep outlier-heavy layers there, then narrow the layer that costs
the least predicted metric per byte saved, while the prediction stays within
``max_drop`` (or until the program fits ``size_budget``). If even the default
costs more than ``max_drop``, the most sensitive layers go back to float
where the target offers it. Every layer gets a one-line reason.
"""

from __future__ import annotations

import math
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
    search = _Search(layers, target, overhead, budget, max_drop)
    search.start(outlier_ratio)
    search.send_worst_to_float(analysis.full_sensitivity)
    search.narrow()
    final_size = search.size()
    if budget is not None and final_size > budget:
        raise EdgeqError(
            f"no plan fits --size-budget {budget:,.0f} bytes on {target.name}: "
            f"the smallest reaches {final_size:,} bytes",
            "raise --size-budget, or pick a target with narrower precisions",
        )
    search.explain_unchanged()
    search.considered[-1].chosen = True
    choice, reason = search.choice, search.reason
    plan = Plan(
        target=target.name,
        layers=[
            LayerPlan(l.name, l.kind, choice[l.name], reason[l.name], l.params, len(l.channel_absmax)) for l in layers
        ],
        intermediate_bits=intermediate_bits,
    )
    return Planned(plan=plan, predicted_drop=search.drop(), program_bytes=final_size, considered=search.considered)


class _Search:
    """The planner's greedy search: a choice per layer, why, which layers are locked, and its path."""

    def __init__(
        self, layers: list[LayerAnalysis], target: Target, overhead: float, budget: float | None, max_drop: float
    ) -> None:
        self.layers, self.target, self.overhead, self.budget, self.max_drop = (
            layers, target, overhead, budget, max_drop
        )  # fmt: skip
        self.choice: dict[str, str] = {}
        self.reason: dict[str, str] = {}
        self.locked: set[str] = set()
        self.considered: list[PlanPoint] = []

    def layer_size(self, l: LayerAnalysis, precision: str) -> float:
        return layer_bytes(l.params, len(l.channel_absmax), l.kind, self.target.precisions[precision])

    def size(self) -> int:
        return int(self.overhead + sum(self.layer_size(l, self.choice[l.name]) for l in self.layers))

    def drop(self) -> float:
        precisions = self.target.precisions
        return sum(_drop(l, self.choice[l.name]) for l in self.layers if not precisions[self.choice[l.name]].is_float)

    def record(self) -> None:
        self.considered.append(PlanPoint(self.size(), self.drop(), dict(self.choice)))

    def start(self, outlier_ratio: float) -> None:
        """The default everywhere (outlier layers locked wide), then same-size swaps predicted to hurt less."""
        target, choice, reason = self.target, self.choice, self.reason
        default = target.default_precision
        for l in self.layers:
            opts = _options(l, target)
            choice[l.name] = default if default in opts else max(opts, key=lambda p: target.precisions[p].weight_bytes)
            reason[l.name] = f"{choice[l.name]}: target default"
            why = _outlier(l, outlier_ratio, CHANNEL_SPREAD)
            if why:
                self.locked.add(l.name)
                reason[l.name] = f"{choice[l.name]}: kept wide, {why}"
        # A precision as small as the default that is predicted to hurt less (dynamic int8 where
        # static int8 ranges are outlier-bound) replaces it before any narrowing.
        for l in self.layers:
            if l.name in self.locked:
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
        self.record()

    def send_worst_to_float(self, full_sensitivity: bool) -> None:
        """Too damaging even at the default: send the most sensitive layers to float. Only on
        sensitivities scored on every analysis batch: a FLOP-budgeted share of a few dozen samples
        flips a prediction or two per layer, which would send sound layers to float; the build's
        measured fallback (after quantization, on held-out training data) handles those models."""
        target, choice = self.target, self.choice
        floatable = [l for l in self.layers if any(target.precisions[p].is_float for p in _options(l, target))]
        while self.drop() > self.max_drop and self.budget is None and full_sensitivity:
            worst = max(
                (l for l in floatable if not target.precisions[choice[l.name]].is_float),
                key=lambda l: _drop(l, choice[l.name]),
                default=None,
            )
            if worst is None or _drop(worst, choice[worst.name]) == 0:
                break
            cost = _drop(worst, choice[worst.name])
            choice[worst.name] = target.narrowest_float(worst.kind, max(abs(worst.act_min), abs(worst.act_max)))
            self.reason[worst.name] = (
                f"{choice[worst.name]}: quantizing it alone is predicted to cost {cost:.2f} points, over --max-drop"
            )
            self.locked.add(worst.name)
            self.record()

    def _cheapest_narrowing(self, current_drop: float) -> tuple | None:
        best = None
        for l in self.layers:
            if l.name in self.locked:
                continue
            for p in _options(l, self.target):
                spec = self.target.precisions[p]
                saved = self.layer_size(l, self.choice[l.name]) - self.layer_size(l, p)
                if spec.is_float or saved <= 0:
                    continue
                cost = _drop(l, p) - _drop(l, self.choice[l.name])
                if self.budget is None and current_drop + cost > self.max_drop:
                    continue
                key = (cost / saved, -saved)
                if best is None or key < best[0]:
                    best = (key, l, p, saved, cost)
        return best

    def narrow(self) -> None:
        """Narrow the layer with the lowest predicted cost per byte saved, until the budget is met
        (or, without a budget, until any further step would exceed --max-drop)."""
        while True:
            if self.budget is not None and self.size() <= self.budget:
                break
            best = self._cheapest_narrowing(self.drop())
            if best is None:
                break
            _, l, p, saved, cost = best
            self.choice[l.name] = p
            self.reason[l.name] = (
                f"{p}: saves {saved:,.0f} bytes for a predicted {cost:+.2f} points "
                f"(Δloss {l.loss_delta.get(p, 0.0):+.4f} with this layer alone quantized)"
            )
            self.record()

    def explain_unchanged(self) -> None:
        """Why each layer the search did not narrow stayed where it is."""
        target, choice = self.target, self.choice
        for l in self.layers:
            if l.name in self.locked or self.reason[l.name].startswith(
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
                self.reason[l.name] = (
                    f"{choice[l.name]}: no narrower precision saves bytes for a {l.kind} layer on {target.name}"
                )
            elif self.budget is None:
                cheapest = min(narrower, key=lambda p: _drop(l, p))
                self.reason[l.name] = (
                    f"{choice[l.name]}: {cheapest} would push the predicted drop to "
                    f"{self.drop() + _drop(l, cheapest) - _drop(l, choice[l.name]):.2f} points, "
                    f"over --max-drop {self.max_drop:g}"
                )
            else:
                self.reason[l.name] = f"{choice[l.name]}: the budget was met without narrowing it"


def narrow_by(analysis: Analysis, target: Target, plan: Plan, save: float) -> Plan:
    """``plan`` with layers narrowed until the planner's estimate has fallen by ``save`` bytes,
    the lowest predicted cost per byte saved first (the planner's own step). Layers in float stay
    float: the planner or the accuracy fallback put them there on a measurement."""
    import copy

    search = _Search(analysis.layers, target, 0.0, None, math.inf)
    search.choice = {entry.name: entry.precision for entry in plan.layers}
    search.reason = {entry.name: entry.reason for entry in plan.layers}
    search.locked = {entry.name for entry in plan.layers if target.precisions[entry.precision].is_float}
    search.budget = search.size() - save
    before = dict(search.choice)
    search.narrow()
    narrowed = copy.deepcopy(plan)
    for entry in narrowed.layers:
        if search.choice[entry.name] != before[entry.name]:
            entry.precision = search.choice[entry.name]
            entry.reason = search.reason[entry.name] + "; narrowed after the lowered program missed --size-budget"
    return narrowed
