"""Accuracy fallback: when the shipped reference misses ``--max-drop``, keep its most sensitive
layers in float.

As in NNCF's accuracy-aware quantization: one layer at a time, most sensitive first, each
step re-quantized (calibration, plus the shipped PTQ candidate's method; QAT is not rerun)
and measured, until the held-out drop is within ``--max-drop`` with 95% confidence (the
paired interval's upper end) or ``fallback_layers`` layers are float. Whether to start,
when to stop and which step ships are decided on the held-out slice of train_data()
(:mod:`edgeq.quant.heldout`); the evaluation data only reports the shipped step.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from edgeq.checks.debug import debug as layer_debug
from edgeq.checks.stats import Paired
from edgeq.context import BuildContext, FloatBaseline
from edgeq.planning.choose import PlanChoice
from edgeq.planning.plan import Plan, budget_in_bytes, layer_bytes, weight_bytes
from edgeq.quant.candidates import PTQMethods
from edgeq.quant.heldout import Selection
from edgeq.quant.ptq import post_training_quantize
from edgeq.quant.qat import trained_float

__all__ = ["Fallback", "FallbackStart", "Shipped", "accuracy_fallback", "ship_with_fallback"]


@dataclass
class Fallback:
    """Layers sent back to float one at a time, by measured sensitivity, until the drop fits."""

    plan: Plan
    reference: torch.fx.GraphModule
    #: per step: the layer sent to float, the reference's held-out metric and drop (with its paired
    #: 95% interval) after it, planned weight bytes
    steps: list[dict[str, Any]]
    improved: bool
    #: how the layers were ranked
    ranked_by: str
    #: the held-out metric of the reference that missed, and of the float model
    start_metric: float
    float_metric: float
    #: whose weights each step quantized: "QAT-trained" or "float"
    weights: str = "float"
    #: why no step was tried although the point estimate missed --max-drop ("": steps were tried)
    skipped: str = ""

    def to_report(self) -> dict[str, Any]:
        return {
            "ranked_by": self.ranked_by,
            "weights": self.weights,
            "start_metric": self.start_metric,
            "float_metric": self.float_metric,
            "steps": self.steps,
            "shipped": self.improved,
            "skipped": self.skipped,
        }


@dataclass
class FallbackStart:
    """The reference that would ship, and how it came about."""

    choice: PlanChoice
    #: the candidate that shipped ("qat", "ptq", or "ptq+" and its methods, edgeq.quant.candidates.METHODS)
    shipped: str
    reference: torch.fx.GraphModule
    #: QAT's trained graph when QAT shipped: each step then quantizes the float model holding
    #: the weights QAT learned, so a step keeps what training gained
    trained_graph: torch.fx.GraphModule | None = None


def accuracy_fallback(
    ctx: BuildContext, baseline: FloatBaseline, start: FallbackStart, selection: Selection
) -> Fallback | None:
    """The best fallback step by held-out metric, or None when the reference already holds (or
    the target has no float precision, or ``fallback_layers`` is 0). It runs only when the
    held-out drop exceeds ``--max-drop`` and is distinguishable from no drop (95%, paired);
    otherwise the returned record says why it did not."""
    config, target = ctx.config, ctx.target
    if not config.fallback_layers or not any(spec.is_float for spec in target.precisions.values()):
        return None
    float_metric = selection.float_metric()
    drop = selection.drop(start.reference)
    metric = float_metric - drop.difference
    if drop.difference <= config.max_drop:
        return None
    why = not_worth_it(drop)
    if why:
        return Fallback(start.choice.plan, start.reference, [], False, "", metric, float_metric, skipped=why)
    ctx.announce("fallback")
    with ctx.stages("fallback"):
        return _fall_back(ctx, baseline, start, selection, (float_metric, metric))


def not_worth_it(drop: Paired) -> str:
    """Why a held-out drop over --max-drop sends no layer to float ("" when it should): a drop the
    held-out samples cannot tell from none is not worth a float layer's bytes."""
    if drop.significant:
        return ""
    return (f"the held-out drop {drop.difference:+.2f} [{drop.low:+.2f}, {drop.high:+.2f}] on {drop.samples} "
            f"samples is not distinguishable from no drop (p = {drop.p_value:.3g})")  # fmt: skip


def _fall_back(
    ctx: BuildContext,
    baseline: FloatBaseline,
    start: FallbackStart,
    selection: Selection,
    metrics: tuple[float, float],
) -> Fallback:
    config, target = ctx.config, ctx.target
    float_metric, metric = metrics
    current = copy.deepcopy(start.choice.plan)
    # Ranked on the reference that missed (the one that would have shipped).
    ranking, ranked_by = _sensitivity_ranking(start.choice, current, baseline, start.reference, selection)
    if config.size_budget is not None:
        ranking = _within_budget(ctx, baseline, current, ranking)
    quantize_step = step_quantizer(ctx, baseline, start, selection.every)
    best: tuple[float, Plan, torch.fx.GraphModule] | None = None
    steps: list[dict[str, Any]] = []
    for layer in ranking[: config.fallback_layers]:
        entry = next(e for e in current.layers if e.name == layer)
        float_name = target.narrowest_float(entry.kind)
        entry.precision = float_name
        entry.reason = (
            f"{float_name}: accuracy fallback, step {len(steps) + 1} (most sensitive quantized layer by "
            f"{ranked_by}); the plan missed --max-drop {config.max_drop:g} on held-out training data"
        )
        reference = quantize_step(current)
        drop = selection.drop(reference)
        step_metric = float_metric - drop.difference
        planned = int(weight_bytes(current, target))
        confident = drop.high <= config.max_drop
        steps.append({
            "layer": layer, "holdout_metric": step_metric, "planned_weight_bytes": planned,
            "drop": drop.difference, "drop_low": drop.low, "drop_high": drop.high, "confident": confident,
        })  # fmt: skip
        if best is None or step_metric > best[0] or confident:
            best = (step_metric, copy.deepcopy(current), reference)
        # The first plan whose drop is within --max-drop with 95% confidence ships: a later
        # step would only buy accuracy the held-out samples cannot show, at a float layer's bytes.
        if confident:
            break
    assert best is not None or not ranking
    if best is None:
        best = (metric, start.choice.plan, start.reference)
    return Fallback(
        plan=best[1],
        reference=best[2],
        steps=steps,
        improved=best[0] > metric,
        ranked_by=ranked_by,
        start_metric=metric,
        float_metric=float_metric,
        weights="QAT-trained" if start.trained_graph is not None else "float",
    )


def step_quantizer(ctx: BuildContext, baseline: FloatBaseline, start: FallbackStart, every: int) -> Any:
    """plan -> converted reference, quantized the way the shipped candidate was (minus QAT)."""
    model: torch.nn.Module = baseline.model
    if start.trained_graph is not None:  # only now: the copy costs a model's worth of memory
        tables = tuple(f"{entry.name}.weight" for entry in start.choice.plan.layers if entry.kind == "embedding")
        model = trained_float(baseline.model, start.trained_graph, keep=tables) or baseline.model
    methods = PTQMethods(ctx, baseline, every)
    method = start.shipped if start.shipped.startswith("ptq+") else None

    def quantize_step(plan: Plan) -> torch.fx.GraphModule:
        spec = ctx.spec(plan, qat=False)
        if method is None:
            return post_training_quantize(model, ctx.recipe, spec, ctx.training, ctx.config.ptq_batches or 16, every)
        # A method that changes nothing on this plan leaves plain PTQ, calibrated once.
        made = methods.quantize(model, spec, method, keep_unchanged=True)
        assert made is not None
        return made[0]

    return quantize_step


def _within_budget(ctx: BuildContext, baseline: FloatBaseline, plan: Plan, ranking: list[str]) -> list[str]:
    """--size-budget is a hard limit: only layers whose float weights still fit it may fall back."""
    target = ctx.target
    assert ctx.config.size_budget is not None
    budget = budget_in_bytes(ctx.config.size_budget, baseline.program_bytes)
    overhead = baseline.program_bytes - 4.0 * sum(e.params for e in plan.layers)
    room = budget - overhead - weight_bytes(plan, target)
    fits = []
    for layer in ranking:
        entry = next(e for e in plan.layers if e.name == layer)
        wide, now = target.precisions[target.narrowest_float(entry.kind)], target.precisions[entry.precision]
        extra = layer_bytes(entry.params, entry.channels, entry.kind, wide) - layer_bytes(
            entry.params, entry.channels, entry.kind, now
        )
        if extra <= room:
            fits.append(layer)
            room -= extra
    return fits


def _sensitivity_ranking(
    choice: PlanChoice, plan: Plan, baseline: FloatBaseline, reference: torch.fx.GraphModule, selection: Selection
) -> tuple[list[str], str]:
    """Planned, quantized layers, most sensitive first: by the analysis' single-layer loss increase
    where there is one, else by the reference's per-layer SQNR against float (lowest first)."""
    quantized = {e.name: e for e in plan.layers}
    if choice.analysis is not None:
        deltas = {
            layer.name: layer.loss_delta.get(quantized[layer.name].precision, 0.0)
            for layer in choice.analysis.layers
            if layer.name in quantized
        }
        return sorted(deltas, key=lambda name: -deltas[name]), "single-layer loss increase (analysis)"
    errors, _ = layer_debug(baseline.model, reference, selection.recipe, source=selection.batches)
    # A layer's SQNR includes its inputs' error; the drop from the previous layer is its own.
    own, previous = {}, None
    for error in errors:
        own[error.layer] = (previous if previous is not None else error.sqnr_db) - error.sqnr_db
        previous = error.sqnr_db
    ranked = sorted((n for n in own if n in quantized), key=lambda n: -own[n])
    return ranked, "SQNR lost at the layer (quantized reference against float)"


@dataclass
class Shipped:
    """What the build lowers: the plan and reference after candidate selection and the fallback."""

    choice: PlanChoice
    reference: torch.fx.GraphModule
    #: a candidate's name (edgeq.quant.candidates), with "+float-fallback" when the fallback shipped
    name: str
    #: the fallback's report (None: it did not run), and the reference it started from
    fallback: dict[str, Any] | None = None
    before_fallback: torch.fx.GraphModule | None = None


def ship_with_fallback(
    ctx: BuildContext, baseline: FloatBaseline, start: FallbackStart, selection: Selection
) -> Shipped:
    """The fallback stage: the selected candidate, or its best fallback step when that does better."""
    fallback = accuracy_fallback(ctx, baseline, start, selection)
    if fallback is None:
        return Shipped(start.choice, start.reference, start.shipped)
    if not fallback.improved:
        return Shipped(start.choice, start.reference, start.shipped, fallback.to_report())
    choice = dataclasses.replace(start.choice, plan=fallback.plan)
    name = f"{start.shipped}+float-fallback"
    return Shipped(choice, fallback.reference, name, fallback.to_report(), start.reference)
