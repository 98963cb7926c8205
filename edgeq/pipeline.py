"""``edgeq.build``: float model + recipe -> quantized, lowered, validated program.

A build is a list of stages, each a function in the module of its step taking the
:class:`~edgeq.context.BuildContext` and the typed results before it (see ``_run``).
Every decision (plan refinement, candidate, fallback) is made on the slice of
train_data() held out of training (edgeq.quant.heldout); the evaluation data is
scored and reported, and decides only the final --max-drop gate.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from edgeq import upstream
from edgeq.backends import load_target
from edgeq.checks import program as checks
from edgeq.checks.numerics import debug_layers
from edgeq.configs import BuildConfig, resolve
from edgeq.context import BuildContext, Progress, QuietProgress, checkpoint_path
from edgeq.lower import float_baseline, lower_reference
from edgeq.planning.budget import fit_budget
from edgeq.planning.choose import choose_plan
from edgeq.planning.fallback import FallbackStart, ship_with_fallback
from edgeq.planning.refine import refine
from edgeq.quant.candidates import choose_candidate, quantize, score_candidates
from edgeq.quant.devices import check_device, init_distributed, seed_everything
from edgeq.quant.heldout import selection_data
from edgeq.quant.qat import world
from edgeq.recipe import Recipe, load_recipe
from edgeq.ship.artifacts import BuildResult, package, write_report
from edgeq.ship.package import OutputDir
from edgeq.ship.report import BuildRecord
from edgeq.timing import Stages

Scores = checks.Scores
__all__ = ["BuildConfig", "BuildResult", "Scores", "build", "checkpoint_path"]


def build(
    recipe: str | Path | Recipe | None = None,
    config: BuildConfig | None = None,
    progress: Progress | None = None,
    qat_overrides: dict[str, Any] | None = None,
    **overrides: Any,
) -> BuildResult | None:
    """Build, validate and package a program; see :class:`BuildConfig`.

    ``overrides`` replace fields of ``config`` (``build(recipe, target="qualcomm", max_drop=2)``);
    ``qat_overrides`` replace QAT settings over the recipe's own (the CLI's given flags); both are
    merged in :func:`edgeq.configs.resolve`. Under torchrun (``WORLD_SIZE`` > 1) QAT runs
    data-parallel; only rank 0 converts, lowers and writes artifacts, and the other ranks return None.
    """
    stages = Stages()
    with stages("load"):
        loaded = load_recipe(recipe)
        config = resolve(config, loaded.qat, overrides, qat_overrides)
        config = replace(config, qat=replace(config.training, device=check_device(config.training.device)))
        ctx = BuildContext(loaded, load_target(config.target), config, stages, progress or QuietProgress())
    rank = init_distributed(config.training.device)
    upstream.apply()
    out_dir = Path(config.out) if config.out else Path("edgeq-out") / loaded.name
    checkpoint = checkpoint_path(out_dir)  # every rank resumes from rank 0's checkpoint
    output = OutputDir.for_rank(out_dir, rank)  # fail early, before minutes of work, if unwritable
    try:
        result = _run(ctx, output, checkpoint)
        if result is None:  # a rank other than 0
            output.discard()
            return None
        result.out_dir = output.commit()
        if checkpoint.exists():
            checkpoint.unlink()
            checkpoint.parent.rmdir()
    except BaseException:
        output.abort()
        raise
    result.gate(config.max_drop)
    return result


def _run(ctx: BuildContext, output: OutputDir, checkpoint: Path) -> BuildResult | None:
    seed_everything(ctx.config.seed)
    checks.arm_preflight(ctx)
    ctx.announce("model")
    baseline = float_baseline(ctx)
    choice = choose_plan(ctx, baseline)
    selection = selection_data(ctx.recipe, ctx.training, baseline.model)
    choice, refined = refine(ctx, choice, baseline, selection)
    with ctx.stages("evaluate"):
        float_eval = ctx.score(baseline.model, "float model")
    quantized = quantize(ctx, choice.plan, baseline, checkpoint)
    if world()[0] != 0:
        return None
    evals = checks.evaluate_models(ctx, float_eval, quantized)
    made = choose_candidate(ctx, choice.plan, baseline, quantized, selection)
    score_candidates(ctx, made, evals)
    trained = quantized.fake_quant if made.shipped == "qat" else None
    start = FallbackStart(choice, made.shipped, made.references[made.shipped], trained)
    shipped = ship_with_fallback(ctx, baseline, start, selection)
    if shipped.before_fallback is not None:
        with ctx.stages("evaluate"):
            evals.reference = ctx.score(shipped.reference, "fallback reference")
    checks.ensure_sdk(ctx, evals)
    lowered = lower_reference(ctx, shipped.reference, baseline)
    shipped, lowered, narrowed = fit_budget(ctx, baseline, start, shipped, selection.every, lowered)
    if narrowed:
        with ctx.stages("evaluate"):
            evals.reference = ctx.score(shipped.reference, "narrowed reference")
    latency = checks.host_latency(ctx, lowered, baseline)
    if shipped.fallback is not None and shipped.before_fallback is not None:
        shipped.fallback.update(checks.fallback_price(ctx, shipped.before_fallback, baseline))
    runner = checks.validate_program(ctx, lowered, evals, baseline)
    arm = checks.arm_kernels(ctx, lowered, runner.scored)
    notes = package(ctx, output, shipped.choice, baseline, shipped.reference, lowered, runner.signature)
    numerics = debug_layers(ctx, shipped.choice.plan, baseline, shipped.reference, lowered)
    plan, sizes = shipped.choice.plan, checks.program_sizes(ctx, shipped.choice.plan, baseline, lowered)
    metric, max_drop = ctx.recipe.metric, ctx.config.max_drop
    ctx.announce("intervals")
    with ctx.stages("intervals"):
        scores = checks.scores(evals, made.measured, shipped.name, made.selected_on, metric, max_drop, made.lowest)
    assert evals.program is not None
    record = BuildRecord(
        ctx.recipe, ctx.target, ctx.config, plan, scores, sizes, lowered, quantized.qat, dict(ctx.stages.seconds),
        evals.program.samples, shipped.choice.analysis, shipped.choice.planned, numerics, notes, latency,
        shipped.fallback, refined, narrowed, arm,
    )  # fmt: skip
    return BuildResult.of(record, write_report(output, record), shipped.reference)
