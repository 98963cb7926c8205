"""Plan checks before training: quantize the plan (PTQ), measure it on held-out data, and change
what the measurement contradicts.

1. The ops between planned layers: quantized or float, the lower held-out loss wins. For a
   CNN, int8 adds and pooling cost nothing measurable; a transformer's residual stream and
   attention carry outlier channels that one per-tensor scale crushes (MiniLM: cosine to
   float 0.87 with them quantized, 0.95 without, PTQ).
2. A planned plan's layers left at a static default move, as a group, to the same-size
   dynamic precision of their kind when that lowers the held-out loss (the single-layer
   predictions cannot see that static ranges fail together).
3. Under ``--max-drop`` (no size budget), the held-out metric of the narrowed plan is
   measured; when it misses, the narrowest plan on the planner's own path that holds is
   found by bisection (single-layer predictions add up; a transformer's errors compound).

Every measurement is on the held-out slice of train_data() (:mod:`edgeq.quant.heldout`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edgeq.context import BuildContext, FloatBaseline
from edgeq.planning.choose import PlanChoice
from edgeq.planning.plan import OTHER_OPS, Plan
from edgeq.quant.heldout import Selection
from edgeq.quant.ptq import post_training_quantize

__all__ = ["Refined", "refine", "refine_plan"]


@dataclass
class Refined:
    choice: PlanChoice
    #: what was measured and decided, for the report (``plan_checks``)
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Checks:
    """The measurements of one refinement, in order."""

    ctx: BuildContext
    baseline: FloatBaseline
    selection: Selection
    measured: list[dict[str, Any]] = field(default_factory=list)

    def measure(self, trial: Plan, what: str) -> dict[str, Any]:
        spec = self.ctx.spec(trial, qat=False)
        reference = post_training_quantize(
            self.baseline.model, self.ctx.recipe, spec, self.ctx.training, 2, self.selection.every
        )
        entry = {
            "what": what,
            "holdout_loss": self.selection.loss(reference),
            "holdout_metric": self.selection.metric(reference),
        }
        self.measured.append(entry)
        return entry


def refine(
    ctx: BuildContext, choice: PlanChoice, baseline: FloatBaseline, selection: Selection
) -> tuple[PlanChoice, dict[str, Any] | None]:
    """The refine stage: an edited plan is kept as written, and so is a plan for a backend that
    quantizes the ops between layers itself; any other plan is checked (:func:`refine_plan`)."""
    if choice.edited or not ctx.backend.plans_other_ops:
        return choice, None
    with ctx.stages("analyze"):
        refined = refine_plan(ctx, choice, baseline, selection)
    return refined.choice, refined.report


def refine_plan(ctx: BuildContext, choice: PlanChoice, baseline: FloatBaseline, selection: Selection) -> Refined:
    """The plan with what its held-out measurements contradict changed (a new plan; ``choice`` is kept)."""
    checks = _Checks(ctx, baseline, selection)
    plan = copy.deepcopy(choice.plan)
    float_metric = selection.float_metric()
    losses = {
        option: checks.measure(dataclasses.replace(plan, other_ops=option), f"other ops {option}")["holdout_loss"]
        for option in OTHER_OPS
    }
    plan.other_ops = min(OTHER_OPS, key=lambda option: losses[option])  # ties keep "quantized"
    report: dict[str, Any] = {"other_ops": {"chosen": plan.other_ops, "holdout_loss": losses}}
    if choice.planned is None:
        report["measured"] = checks.measured
        return Refined(dataclasses.replace(choice, plan=plan), report)
    current = checks.measured[-1] if plan.other_ops == OTHER_OPS[-1] else checks.measured[0]
    swaps, current = _dynamic_swaps(checks, plan, current)
    planned = copy.deepcopy(choice.planned)
    path = planned.considered
    over = float_metric - current["holdout_metric"] > ctx.config.max_drop
    if ctx.config.size_budget is None and over and len(path) > 1:
        report["backed_off_to_step"] = _back_off(checks, plan, path, swaps, float_metric)
    report["float_holdout_metric"] = float_metric
    report["measured"] = checks.measured
    return Refined(dataclasses.replace(choice, plan=plan, planned=planned), report)


def _same_size_dynamic(ctx: BuildContext, plan: Plan) -> dict[str, str]:
    """Static default layers -> the same-size dynamic precision of their kind, where the menu has one."""
    target = ctx.target
    default = target.precisions[target.default_precision]
    swaps: dict[str, str] = {}
    if default.activations != "static":
        return swaps
    for entry in plan.layers:
        if entry.precision != default.name:
            continue
        same = [
            name
            for name, spec in target.precisions.items()
            if entry.kind in spec.ops
            and spec.activations == "dynamic"
            and spec.weight_bytes == default.weight_bytes
            and spec.weight_bits >= default.weight_bits
        ]
        if same:
            swaps[entry.name] = same[0]
    return swaps


def _dynamic_swaps(checks: _Checks, plan: Plan, current: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """Move the static default layers to dynamic as a group when the held-out loss falls; in place on ``plan``."""
    default = checks.ctx.target.default_precision
    swaps = _same_size_dynamic(checks.ctx, plan)
    if not swaps:
        return swaps, current
    trial = copy.deepcopy(plan)
    for entry in trial.layers:
        if entry.name in swaps:
            entry.precision = swaps[entry.name]
    swapped = checks.measure(trial, f"{len(swaps)} static {default} layers -> {', '.join(sorted(set(swaps.values())))}")
    if swapped["holdout_loss"] >= current["holdout_loss"]:
        return {}, current
    for entry in plan.layers:
        if entry.name in swaps:
            entry.precision = swaps[entry.name]
            entry.reason = f"{swaps[entry.name]}: as small as {default}, lower measured held-out loss"
    return swaps, swapped


def _back_off(checks: _Checks, plan: Plan, path: list, swaps: dict[str, str], float_metric: float) -> int:
    """Bisect the planner's path for the narrowest step whose held-out drop is within --max-drop;
    widen ``plan`` to it (in place) and mark it chosen. Returns the step."""
    default, max_drop = checks.ctx.target.default_precision, checks.ctx.config.max_drop

    def step_plan(k: int) -> Plan:
        trial = copy.deepcopy(plan)
        for entry in trial.layers:
            chosen = path[k].precisions.get(entry.name, entry.precision)
            entry.precision = swaps.get(entry.name, chosen) if chosen == default else chosen
        return trial

    # path[0] is the plan before any narrowing; the last step is the plan as planned.
    low, high, best = 0, len(path) - 1, 0
    while low <= high:
        mid = (low + high) // 2
        trial_metric = checks.measure(step_plan(mid), f"planner step {mid} of {len(path) - 1}")["holdout_metric"]
        if float_metric - trial_metric <= max_drop:
            best, low = mid, mid + 1
        else:
            high = mid - 1
    kept = {e.name: e.precision for e in step_plan(best).layers}
    for entry in plan.layers:
        if kept[entry.name] != entry.precision:
            entry.reason = (
                f"{kept[entry.name]}: kept wider, the measured held-out drop of the narrower plan was over "
                f"--max-drop {max_drop:g}"
            )
            entry.precision = kept[entry.name]
    for point in path:
        point.chosen = False
    path[best].chosen = True
    return best
