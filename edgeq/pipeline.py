"""``edgeq.build``: float model + recipe -> quantized, lowered, validated program.

A build is a short list of stages, each a function in the module of its step
taking the :class:`~edgeq.context.BuildContext` and the typed results before it:

capture (edgeq.lower.float_baseline) -> analyse + plan (edgeq.planning.choose)
-> refine (edgeq.planning.refine) -> quantize (edgeq.quant.candidates.quantize)
-> select (edgeq.quant.candidates.choose_candidate) -> fallback
(edgeq.planning.fallback) -> lower (edgeq.lower.lower_reference) -> validate
(edgeq.checks.program) -> package (edgeq.ship.artifacts) -> debug
(edgeq.checks.numerics) -> report (edgeq.ship.artifacts.write_report).

Every decision (plan refinement, candidate, fallback) is made on the slice of
train_data() held out of training (edgeq.quant.heldout); the evaluation data is
scored and reported, and decides only the final --max-drop gate.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgeq import upstream
from edgeq.backends import load_target
from edgeq.checks.program import (
    Evaluations,
    Scores,
    ensure_sdk,
    fallback_price,
    host_latency,
    program_sizes,
    scores,
    validate_program,
)  # fmt: skip
from edgeq.configs import BuildConfig, resolve
from edgeq.context import BuildContext, Progress, QuietProgress, checkpoint_path
from edgeq.errors import AccuracyError
from edgeq.lower import Lowered, float_baseline, lower_reference
from edgeq.planning.choose import choose_plan
from edgeq.planning.fallback import FallbackStart, accuracy_fallback
from edgeq.planning.plan import Plan
from edgeq.planning.refine import refine_plan
from edgeq.quant.candidates import choose_candidate, quantize, score_candidates
from edgeq.quant.devices import check_device, init_distributed, seed_everything
from edgeq.quant.heldout import selection_data
from edgeq.quant.qat import QATReport, world
from edgeq.recipe import Recipe, load_recipe
from edgeq.ship.artifacts import package, write_report
from edgeq.ship.package import OutputDir
from edgeq.ship.report import BuildRecord
from edgeq.targets import Target
from edgeq.timing import Stages

__all__ = ["BuildConfig", "BuildResult", "Scores", "build", "checkpoint_path"]


@dataclass
class BuildResult:
    recipe: str
    target: Target
    plan: Plan
    scores: Scores
    sizes: dict[str, int]
    lowered: Lowered
    qat: QATReport
    timings: dict[str, float]
    out_dir: Path | None
    report: dict[str, Any]
    #: the converted PT2E reference (q/dq on floats), kept for debugging
    reference_model: torch.nn.Module | None = None

    @property
    def drop(self) -> float:
        return self.scores.float - self.scores.program


def build(
    recipe: str | Path | Recipe | None = None,
    config: BuildConfig | None = None,
    progress: Progress | None = None,
    qat_overrides: dict[str, Any] | None = None,
    **overrides: Any,
) -> BuildResult | None:
    """Build, validate and package a program; see :class:`BuildConfig`.

    ``overrides`` replace fields of ``config`` (``build(recipe, target="qualcomm", max_drop=2)``);
    ``qat_overrides`` replace QAT settings over the recipe's own (the CLI's given flags). Both are
    merged in one place, :func:`edgeq.configs.resolve`.
    Under torchrun (``WORLD_SIZE`` > 1) QAT runs data-parallel; only rank 0
    converts, lowers and writes artifacts, and the other ranks return None.
    """
    stages = Stages()
    with stages("load"):
        loaded = load_recipe(recipe)
        config = resolve(config, loaded.qat, overrides, qat_overrides)
        config = dataclasses.replace(
            config, qat=dataclasses.replace(config.training, device=check_device(config.training.device))
        )
        ctx = BuildContext(loaded, load_target(config.target), config, stages, progress or QuietProgress())
    rank = init_distributed(config.training.device)
    upstream.apply()
    out_dir = Path(config.out) if config.out else Path("edgeq-out") / loaded.name
    checkpoint = checkpoint_path(out_dir)  # every rank resumes from rank 0's checkpoint
    if rank != 0:  # other ranks train alongside rank 0 and write nothing
        out_dir = Path(tempfile.mkdtemp(prefix=f"edgeq-rank{rank}-")) / "out"
    output = OutputDir(out_dir)  # fail early, before minutes of work, if unwritable
    try:
        result = _run(ctx, output, checkpoint)
        if result is None:  # a rank other than 0
            output.abort()
            shutil.rmtree(out_dir.parent, ignore_errors=True)
            return None
        result.out_dir = output.commit()
        if checkpoint.exists():
            checkpoint.unlink()
            checkpoint.parent.rmdir()
    except BaseException:
        output.abort()
        raise
    _gate(result, config)
    return result


def _run(ctx: BuildContext, output: OutputDir, checkpoint: Path) -> BuildResult | None:
    seed_everything(ctx.config.seed)
    ctx.announce("model")
    baseline = float_baseline(ctx)
    choice = choose_plan(ctx, baseline)
    selection = selection_data(ctx.recipe, ctx.training, baseline.model)
    refined = None
    if not choice.edited and ctx.backend.plans_other_ops:
        with ctx.stages("analyze"):
            refinement = refine_plan(ctx, choice, baseline, selection)
        choice, refined = refinement.choice, refinement.report
    with ctx.stages("evaluate"):
        float_eval = ctx.score(baseline.model, "float model")
    ctx.announce("qat")
    quantized = quantize(ctx, choice.plan, baseline, checkpoint)
    if world()[0] != 0:
        return None
    ctx.announce("evaluate")
    with ctx.stages("evaluate"):
        qat_eval = ctx.score(quantized.fake_quant, "QAT (simulated)")
        qat_ref_eval = ctx.score(quantized.reference, "converted reference")
    made = choose_candidate(ctx, choice.plan, baseline, quantized, selection)
    evals = Evaluations(float=float_eval, qat=qat_eval, qat_reference=qat_ref_eval, reference=qat_ref_eval)
    score_candidates(ctx, made, evals)
    shipped, reference = made.shipped, made.references[made.shipped]
    trained = quantized.fake_quant if shipped == "qat" else None
    fallback = accuracy_fallback(ctx, baseline, FallbackStart(choice, shipped, reference, trained), selection)
    fallback_report = fallback.to_report() if fallback is not None else None
    before_fallback = reference
    if fallback is not None and fallback.improved:
        reference, shipped = fallback.reference, f"{shipped}+float-fallback"
        choice = dataclasses.replace(choice, plan=fallback.plan)
        with ctx.stages("evaluate"):
            evals.reference = ctx.score(reference, "fallback reference")
    ensure_sdk(ctx, evals)
    lowered = lower_reference(ctx, reference, baseline)
    latency = host_latency(ctx, lowered, baseline)
    if fallback_report is not None and fallback_report["shipped"]:
        fallback_report.update(fallback_price(ctx, before_fallback, baseline))
    runner = validate_program(ctx, lowered, evals)
    notes = package(ctx, output, choice, baseline, reference, lowered, runner.signature)
    from edgeq.checks.numerics import debug_layers

    numerics = debug_layers(ctx, choice.plan, baseline, reference, lowered)
    sizes = program_sizes(ctx, choice.plan, baseline, lowered)
    final = scores(evals, made.measured, shipped, made.selected_on)
    assert evals.program is not None
    record = BuildRecord(
        ctx.recipe, ctx.target, ctx.config, choice.plan, final, sizes, lowered, quantized.qat, dict(ctx.stages.seconds),
        evals.program.samples, choice.analysis, choice.planned, numerics, notes, latency, fallback_report, refined,
    )  # fmt: skip
    report = write_report(output, record)
    return BuildResult(
        ctx.recipe.name, ctx.target, choice.plan, final, sizes, lowered, quantized.qat, dict(ctx.stages.seconds),
        None, report, reference,
    )  # fmt: skip


def _gate(result: BuildResult, config: BuildConfig) -> None:
    """--max-drop: the one place the evaluation data counts, and it decides only pass or fail."""
    if result.drop > config.max_drop:
        raise AccuracyError(
            f"the program's {result.scores.program:.2f} is {result.drop:.2f} points below float "
            f"({result.scores.float:.2f}), over --max-drop {config.max_drop}; artifacts are in "
            f"{result.out_dir} for inspection",
            "train longer (--steps), keep sensitive layers wider in plan.json, or raise --max-drop",
        )
