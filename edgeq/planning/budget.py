"""The size-budget stage: --size-budget is a promise. When the lowered program misses it (the
planner predicts bytes from the menu's costs; a real program carries a little more), the plan is
narrowed by the measured excess, re-quantized the way the shipped candidate was, and lowered
again, a bounded number of times; the build ships a program that fits or says why it cannot."""

from __future__ import annotations

import dataclasses
from typing import Any

from edgeq.context import BuildContext, FloatBaseline
from edgeq.errors import EdgeqError
from edgeq.lower import Lowered, lower
from edgeq.planning.fallback import FallbackStart, Shipped, step_quantizer
from edgeq.planning.plan import budget_in_bytes, weight_bytes
from edgeq.planning.planner import narrow_by

__all__ = ["MAX_NARROWINGS", "fit_budget"]

#: lowerings after the first that may narrow the plan further
MAX_NARROWINGS = 3
#: bytes narrowed beyond the measured excess, as a share of it: a narrower layer's real program
#: bytes differ from the menu's estimate in the same direction as the excess did
MARGIN = 0.25


def fit_budget(
    ctx: BuildContext, baseline: FloatBaseline, start: FallbackStart, shipped: Shipped, every: int, lowered: Lowered
) -> tuple[Shipped, Lowered, list[dict[str, Any]]]:
    """The shipped plan and program, narrowed until the program fits --size-budget; with each
    narrowing (measured excess, layers narrowed, program bytes) for the report."""
    config = ctx.config
    if config.size_budget is None:
        return shipped, lowered, []
    budget = budget_in_bytes(config.size_budget, baseline.program_bytes)
    steps: list[dict[str, Any]] = []
    quantize_step = None
    while len(lowered.program) > budget:
        excess = len(lowered.program) - budget
        analysis = shipped.choice.analysis
        if analysis is None or len(steps) >= MAX_NARROWINGS:
            why = "the plan was given, not planned" if analysis is None else f"after {len(steps)} narrowings"
            raise EdgeqError(
                f"model.pte is {len(lowered.program):,} bytes, over --size-budget {budget:,.0f} ({why})",
                "raise --size-budget, or edit plan.json to narrow more layers",
            )
        plan = narrow_by(analysis, ctx.target, shipped.choice.plan, excess * (1 + MARGIN))
        moved = [e.name for e, old in zip(plan.layers, shipped.choice.plan.layers) if e.precision != old.precision]
        if not moved:
            raise EdgeqError(
                f"model.pte is {len(lowered.program):,} bytes, over --size-budget {budget:,.0f}, and no layer "
                "can be narrowed further on this target",
                "raise --size-budget, or pick a target with narrower precisions",
            )
        ctx.announce("size budget")
        with ctx.stages("size budget"):
            quantize_step = quantize_step or step_quantizer(ctx, baseline, start, every)
            reference = quantize_step(plan)
            lowered = lower(reference, baseline.example_inputs, ctx.target, allow_download=config.allow_sdk_download)
        steps.append(
            {
                "excess_bytes": excess,
                "narrowed": moved,
                "planned_weight_bytes": int(weight_bytes(plan, ctx.target)),
                "program_bytes": len(lowered.program),
            }
        )
        shipped = dataclasses.replace(
            shipped, choice=dataclasses.replace(shipped.choice, plan=plan), reference=reference
        )
    return shipped, lowered, steps
