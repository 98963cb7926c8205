"""The plan stage: an edited plan, a uniform precision, or a plan measured layer by layer."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from edgeq.context import BuildContext, FloatBaseline
from edgeq.errors import EdgeqError
from edgeq.lower import lower
from edgeq.planning.analysis import Analysis, analyze
from edgeq.planning.plan import Plan, uniform_plan, validate_plan, weight_bytes
from edgeq.planning.planner import Planned, make_plan
from edgeq.quant.ptq import post_training_quantize

__all__ = ["PlanChoice", "choose_plan", "program_overhead"]


@dataclass(frozen=True)
class PlanChoice:
    plan: Plan
    #: None when the plan was given (edited plan or uniform precision)
    analysis: Analysis | None = None
    planned: Planned | None = None
    #: an edited plan.json (--plan): kept as written, never refined
    edited: bool = False


def choose_plan(ctx: BuildContext, baseline: FloatBaseline) -> PlanChoice:
    """An edited plan (``--plan``), a uniform precision (``--precision``), or the planner's plan."""
    config, target = ctx.config, ctx.target
    if config.plan is not None:
        plan = config.plan if isinstance(config.plan, Plan) else Plan.load(config.plan)
        if plan.float_ops:
            _check_float_ops(plan, ctx, baseline)
        return PlanChoice(
            validate_plan(copy.deepcopy(plan), baseline.model, target, baseline.example_inputs), edited=True
        )
    if config.precision is not None:
        plan = uniform_plan(baseline.model, target, config.precision, example_inputs=baseline.example_inputs)
        return PlanChoice(dataclasses.replace(plan, intermediate_bits=ctx.training.intermediate_bits))
    ctx.announce("analyze")
    with ctx.stages("analyze"):
        analysis = analyze(baseline.model, ctx.recipe, target, flops=config.analysis_flops)
        overhead = None
        if config.size_budget is not None and not ctx.backend.float_baseline_overhead:
            overhead = program_overhead(ctx, baseline)
        planned = make_plan(
            analysis,
            target,
            baseline.program_bytes,
            max_drop=config.max_drop,
            size_budget=config.size_budget,
            outlier_ratio=config.outlier_ratio,
            intermediate_bits=ctx.training.intermediate_bits,
            program_overhead=overhead,
        )
    if ctx.backend.plans_other_ops:  # a backend that can run an op in float between quantized ones
        planned.plan.float_ops = [c.node for c in analysis.concats if c.keep_float]
    else:
        wide = _widest_activations(target)
        if wide is not None:
            planned.plan.wide_ops = {c.node: wide for c in analysis.concats if c.widen}
    return PlanChoice(planned.plan, analysis, planned)


def program_overhead(ctx: BuildContext, baseline: FloatBaseline) -> float:
    """Bytes a real program of this target carries beyond its weights: the default plan, PTQ, lowered."""
    plan = uniform_plan(baseline.model, ctx.target, example_inputs=baseline.example_inputs)
    spec = ctx.spec(plan, qat=False)
    reference = post_training_quantize(baseline.model, ctx.recipe, spec, ctx.training, batches=2)
    lowered = lower(reference, baseline.example_inputs, ctx.target, allow_download=ctx.config.allow_sdk_download)
    return max(0.0, len(lowered.program) - weight_bytes(plan, ctx.target))


def _check_float_ops(plan: Plan, ctx: BuildContext, baseline: FloatBaseline) -> None:
    """An edited plan's float_ops: a backend that runs float ops between quantized ones, and ops the
    exported graph has."""
    if not ctx.backend.plans_other_ops:
        raise EdgeqError(
            f"the plan keeps ops in float ({', '.join(plan.float_ops)}), which {ctx.backend.title} cannot run",
            "remove float_ops from the plan for this target",
        )
    # The float capture the baseline already holds names the ops as the quantizer's capture does.
    nodes = {n.name for n in baseline.graph.graph.nodes if n.op == "call_function"}
    missing = [name for name in plan.float_ops if name not in nodes]
    if missing:
        raise EdgeqError(
            f"the plan's float_ops name ops the exported graph lacks: {', '.join(missing)}",
            "use node names that analysis.json lists under concats (e.g. cat_2), or remove them",
        )


def _widest_activations(target) -> str | None:
    """The precision with the widest static activations and 8-bit (or wider) weights, if wider than
    the default's: what a mixed-range op gets where float is not on the menu."""
    default = target.precisions[target.default_precision]
    options = [
        (p.activation_bits, p.weight_bits, name)
        for name, p in target.precisions.items()
        if p.activations == "static" and not p.is_float and p.weight_bits >= 8
    ]
    best = max(options, default=None)
    return best[2] if best is not None and best[0] > default.activation_bits else None
