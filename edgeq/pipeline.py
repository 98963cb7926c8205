"""``edgeq.build``: float model + recipe -> quantized, lowered, validated program.

Stages run in one direction, each a function with a typed result:
recipe -> capture (float baseline) -> analysis/plan -> quantize (prepare, QAT,
convert) -> lower -> check -> ship. Each stage's work lives in its own
package; this module only wires them together, times them and decides
whether the result ships.
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgeq import capture as capture_mod
from edgeq import upstream
from edgeq.backends import build_quantizer, get_backend
from edgeq.checks.evaluate import Evaluation, agreement, evaluate
from edgeq.configs import DEBUG_PROGRAM_LAYERS, BuildConfig
from edgeq.errors import AccuracyError, EdgeqError, SdkMissingError
from edgeq.lower import Lowered, lower, lower_float
from edgeq.planning.analysis import Analysis, analyze
from edgeq.planning.plan import Plan, uniform_plan, validate_plan, weight_bytes
from edgeq.planning.planner import Planned, make_plan
from edgeq.quant.convert import convert, prepare
from edgeq.quant.devices import check_device, init_distributed, seed_everything
from edgeq.quant.ptq import post_training_quantize
from edgeq.quant.qat import QATConfig, QATReport, run_qat, to_eval, world
from edgeq.recipe import Recipe, load_recipe
from edgeq.targets import Target, load_target
from edgeq.timing import Stages

__all__ = ["BuildConfig", "BuildResult", "Scores", "build", "checkpoint_path", "quantize"]


@dataclass
class Scores:
    float: builtins.float
    qat: builtins.float
    #: the shipped converted reference (QAT's, or PTQ's when it scored higher)
    reference: builtins.float
    program: builtins.float
    agreement: dict[str, builtins.float]
    #: plain PTQ of the same plan, converted reference (None: not measured)
    ptq: builtins.float | None = None
    #: QAT's converted reference, whether shipped or not
    qat_reference: builtins.float | None = None
    #: "qat" or "ptq": which quantized model the program was lowered from
    shipped: str = "qat"


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


@dataclass
class FloatBaseline:
    """The float model as captured, and the float program sizes are measured against."""

    model: torch.nn.Module
    example_inputs: tuple
    graph: torch.fx.GraphModule
    program_bytes: int


@dataclass
class PlanChoice:
    plan: Plan
    #: None when the plan was given (edited plan or uniform precision)
    analysis: Analysis | None = None
    planned: Planned | None = None


@dataclass
class Quantized:
    fake_quant: torch.fx.GraphModule
    reference: torch.fx.GraphModule
    qat: QATReport


def quantize(
    recipe: Recipe,
    target: Target,
    plan: Plan,
    config: QATConfig,
    stages: Stages,
    on_step: Callable[[int, float], None] | None = None,
    float_model: torch.nn.Module | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
) -> Quantized:
    """capture -> prepare -> QAT -> convert."""
    model = float_model if float_model is not None else recipe.model().eval()
    with stages("export"):
        graph = capture_mod.capture_for_quantization(model, recipe.example_inputs(), config.fold_bn)
    with stages("prepare"):
        prepared = prepare(graph, build_quantizer(plan, target, qat=True, ranges=config.ranges), qat=True)
    with stages("qat"):
        report = run_qat(
            prepared,
            recipe,
            config,
            teacher=model if config.loss != "task" else None,
            on_step=on_step,
            checkpoint=checkpoint,
            fingerprint=fingerprint(recipe, target, plan, config),
            resume=resume,
        )
    with stages("convert"):
        # convert_pt2e rewrites the graph in place; keep the fake-quant model for scoring.
        reference = convert(copy.deepcopy(prepared))
    return Quantized(fake_quant=to_eval(prepared), reference=reference, qat=report)


def fingerprint(recipe: Recipe, target: Target, plan: Plan, config: QATConfig) -> str:
    """What a QAT checkpoint must match to be resumed."""
    import hashlib
    import json

    data: dict[str, Any] = {
        "recipe": recipe.fingerprint,
        "target": target.name,
        "plan": plan.to_dict(),
        "qat": config.to_dict(),
    }
    data["qat"].pop("checkpoint_every", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_path(out_dir: Path) -> Path:
    """Beside the output directory, so that a failed build leaves that directory untouched."""
    out_dir = Path(out_dir).absolute()
    return out_dir.with_name(f".{out_dir.name}.edgeq-checkpoint") / "qat.pt"


def build(
    recipe: str | Path | Recipe | None = None,
    config: BuildConfig | None = None,
    progress: Any = None,
    **overrides: Any,
) -> BuildResult | None:
    """Build, validate and package a program; see :class:`BuildConfig`.

    ``overrides`` replace fields of ``config`` (``build(recipe, target="qualcomm", max_drop=2)``);
    a name BuildConfig lacks is an error. ``progress`` may provide ``stage(name)``,
    ``qat_start(steps)``, ``step(i, loss)``, ``eval_start(label)``, ``eval_advance(k)`` and
    ``eval_end()`` (the CLI's rich display does).

    Under torchrun (``WORLD_SIZE`` > 1) QAT runs data-parallel; only rank 0
    converts, lowers and writes artifacts, and the other ranks return None.
    """
    config = config or BuildConfig()
    try:
        config = dataclasses.replace(config, **overrides)
    except TypeError as exc:
        names = ", ".join(f.name for f in dataclasses.fields(BuildConfig))
        raise EdgeqError(f"build() got an unknown setting: {exc}", f"use one of: {names}") from None
    config = dataclasses.replace(config, qat=dataclasses.replace(config.qat, device=check_device(config.qat.device)))
    rank = init_distributed(config.qat.device)
    upstream.apply()
    stages = Stages()
    with stages("load"):
        recipe = load_recipe(recipe)
        target = load_target(config.target)
    out_dir = Path(config.out) if config.out else Path("edgeq-out") / recipe.name
    checkpoint = checkpoint_path(out_dir)  # every rank resumes from rank 0's checkpoint
    from edgeq.ship.package import OutputDir

    if rank != 0:
        # Other ranks train alongside rank 0 and write nothing.
        import tempfile

        out_dir = Path(tempfile.mkdtemp(prefix=f"edgeq-rank{rank}-")) / "out"
    output = OutputDir(out_dir)  # fail early, before minutes of work, if unwritable
    try:
        result = _build(recipe, target, config, stages, progress, output, checkpoint)
        if result is None:  # a rank other than 0
            output.abort()
            import shutil

            shutil.rmtree(out_dir.parent, ignore_errors=True)
            return None
        final = output.commit()
        result.out_dir = final
        if checkpoint.exists():
            checkpoint.unlink()
            checkpoint.parent.rmdir()
    except BaseException:
        output.abort()
        raise
    if result.drop > config.max_drop:
        raise AccuracyError(
            f"the program's {result.scores.program:.2f} is {result.drop:.2f} points below float "
            f"({result.scores.float:.2f}), over --max-drop {config.max_drop}; artifacts are in {final} for inspection",
            "train longer (--steps), keep sensitive layers wider in plan.json, or raise --max-drop",
        )
    return result


def _announce(progress: Any, name: str) -> None:
    if progress is not None and hasattr(progress, "stage"):
        progress.stage(name)


def float_baseline(recipe: Recipe, target: Target, stages: Stages) -> FloatBaseline:
    """The user's float model, checked, captured and lowered as the size baseline."""
    with stages("model"):
        try:
            model = recipe.model()
        except Exception as exc:
            raise EdgeqError(f"recipe model() raised {type(exc).__name__}: {exc}", "fix the recipe's model()") from exc
        if not isinstance(model, torch.nn.Module):
            raise EdgeqError(f"recipe model() returned {type(model).__name__}", "return a torch.nn.Module")
        model = model.eval()
        example_inputs = recipe.example_inputs()
    with stages("export"):
        # Checks the example inputs and export-ability first, with errors that name the cause.
        graph = capture_mod.capture(model, example_inputs, dynamic_batch=False)
    with stages("lower"):
        program_bytes = len(lower_float(model, example_inputs, target))
    return FloatBaseline(model=model, example_inputs=example_inputs, graph=graph, program_bytes=program_bytes)


def choose_plan(
    recipe: Recipe, target: Target, config: BuildConfig, baseline: FloatBaseline, stages: Stages, progress: Any = None
) -> PlanChoice:
    """An edited plan, a uniform precision, or a plan measured layer by layer."""
    if config.plan is not None:
        plan = config.plan if isinstance(config.plan, Plan) else Plan.load(config.plan)
        return PlanChoice(validate_plan(copy.deepcopy(plan), baseline.model, target, baseline.example_inputs))
    if config.precision is not None:
        return PlanChoice(
            uniform_plan(baseline.model, target, config.precision, example_inputs=baseline.example_inputs)
        )
    _announce(progress, "analyze")
    with stages("analyze"):
        analysis = analyze(baseline.model, recipe, target)
        overhead = None
        if config.size_budget is not None and not get_backend(target.backend).float_baseline_overhead:
            overhead = program_overhead(recipe, target, config, baseline)
        planned = make_plan(
            analysis,
            target,
            baseline.program_bytes,
            max_drop=config.max_drop,
            size_budget=config.size_budget,
            outlier_ratio=config.outlier_ratio,
            intermediate_bits=config.qat.intermediate_bits,
            program_overhead=overhead,
        )
    return PlanChoice(planned.plan, analysis, planned)


def program_overhead(recipe: Recipe, target: Target, config: BuildConfig, baseline: FloatBaseline) -> float:
    """Bytes a real program of this target carries beyond its weights: the default plan, PTQ, lowered."""
    plan = uniform_plan(baseline.model, target, example_inputs=baseline.example_inputs)
    reference = post_training_quantize(baseline.model, recipe, target, plan, config.qat, batches=2)
    program = lower(reference, baseline.example_inputs, target, allow_download=config.allow_sdk_download).program
    return max(0.0, len(program) - weight_bytes(plan, target))


def check_lowered_size(config: BuildConfig, baseline: FloatBaseline, lowered: Lowered) -> None:
    if config.size_budget is None:
        return
    budget = config.size_budget * baseline.program_bytes if config.size_budget <= 1 else config.size_budget
    if len(lowered.program) > budget:
        raise EdgeqError(
            f"model.pte is {len(lowered.program):,} bytes, over --size-budget {budget:,.0f}",
            "lower --size-budget slightly to leave the planner a margin, or edit plan.json to narrow more layers",
        )


def _build(
    recipe: Recipe, target: Target, config: BuildConfig, stages: Stages, progress: Any, output: Any, checkpoint: Path
) -> BuildResult | None:
    from edgeq.ship.package import sha256, write_bytes_atomic, write_json_atomic
    from edgeq.ship.report import build_report, manifest, write_html

    backend = get_backend(target.backend)
    seed_everything(config.seed)
    config = dataclasses.replace(config, qat=dataclasses.replace(config.qat, seed=config.seed))
    _announce(progress, "model")
    baseline = float_baseline(recipe, target, stages)
    choice = choose_plan(recipe, target, config, baseline, stages, progress)
    plan = choice.plan
    if config.plan is not None:
        # An edited plan may change the intermediate width (0 turns it off).
        config = dataclasses.replace(
            config, qat=dataclasses.replace(config.qat, intermediate_bits=plan.intermediate_bits)
        )
    with stages("evaluate"):
        float_eval = _score(baseline.model, recipe, progress, "float model")
    _announce(progress, "qat")
    on_step = getattr(progress, "step", None) if progress is not None else None
    if progress is not None and hasattr(progress, "qat_start"):
        progress.qat_start(config.qat.steps)
    quantized = quantize(
        recipe, target, plan, config.qat, stages, on_step, baseline.model, checkpoint=checkpoint, resume=config.resume
    )
    if world()[0] != 0:
        return None
    _announce(progress, "evaluate")
    with stages("evaluate"):
        qat_eval = _score(quantized.fake_quant, recipe, progress, "QAT (simulated)")
        ref_eval = _score(quantized.reference, recipe, progress, "converted reference")
    qat_ref_eval, ptq_eval, shipped = ref_eval, None, "qat"
    if config.ptq_batches:
        _announce(progress, "ptq")
        with stages("ptq"):
            ptq_reference = post_training_quantize(baseline.model, recipe, target, plan, config.qat, config.ptq_batches)
        with stages("evaluate"):
            ptq_eval = _score(ptq_reference, recipe, progress, "PTQ reference (calibration only)")
        if ptq_eval.metric > ref_eval.metric:
            # QAT made the model worse than calibration alone: ship the better one, and say so.
            quantized = dataclasses.replace(quantized, reference=ptq_reference)
            ref_eval, shipped = ptq_eval, "ptq"
    try:
        backend.ensure_sdk(config.allow_sdk_download)
    except SdkMissingError as exc:
        raise SdkMissingError(
            f"quantized reference validated on the host: {ref_eval.metric:.2f} (float {float_eval.metric:.2f}, "
            f"QAT {qat_eval.metric:.2f}); {exc.cause}",
            exc.fix,
        ) from None
    _announce(progress, "lower")
    with stages("lower"):
        lowered = lower(
            quantized.reference,
            baseline.example_inputs,
            target,
            float_graph=baseline.graph,
            allow_download=config.allow_sdk_download,
        )
    check_lowered_size(config, baseline, lowered)
    _announce(progress, "validate")
    with stages("validate"):
        runner = backend.runner(lowered.program)
        program_eval = _score(runner, recipe, progress, "model.pte (ExecuTorch runtime)")
    scores = Scores(
        float=float_eval.metric,
        qat=qat_eval.metric,
        reference=ref_eval.metric,
        program=program_eval.metric,
        ptq=ptq_eval.metric if ptq_eval is not None else None,
        qat_reference=qat_ref_eval.metric,
        shipped=shipped,
        agreement={
            "qat_vs_reference": agreement(qat_eval.outputs, qat_ref_eval.outputs),
            "reference_vs_program": agreement(ref_eval.outputs, program_eval.outputs),
            "qat_vs_program": agreement(qat_eval.outputs, program_eval.outputs),
            "float_vs_program": agreement(float_eval.outputs, program_eval.outputs),
        },
    )
    sizes = {
        "float_program_bytes": baseline.program_bytes,
        "program_bytes": len(lowered.program),
        "planned_weight_bytes": int(weight_bytes(plan, target)),
    }
    _announce(progress, "package")
    with stages("package"):
        from edgeq.ship.bundle import write_bundle

        write_bytes_atomic(output.path("model.pte"), lowered.program)
        plan.save(output.path("plan.json"))
        notes = {**backend.program_notes(lowered.program), **lowered.payloads()}
        man = manifest(
            recipe,
            target,
            config,
            runner.signature,
            baseline.example_inputs,
            baseline.model,
            sha256(lowered.program),
            program_notes=notes,
        )
        write_json_atomic(output.path("manifest.json"), man)
        if choice.analysis is not None:
            choice.analysis.save(output.path("analysis.json"))
        write_bundle(output.path("bundle"), lowered.program, man)
        # The converted reference, for `edgeq validate` and numeric debugging.
        torch.export.save(
            capture_mod.export(quantized.reference, baseline.example_inputs), str(output.path("reference.pt2"))
        )
    _announce(progress, "debug")
    with stages("debug"):
        layer_errors, first_divergence, program_layers = debug_layers(
            recipe, target, config, plan, baseline, quantized, lowered
        )
    report = build_report(
        recipe,
        target,
        config,
        plan,
        scores,
        sizes,
        lowered,
        quantized.qat,
        stages.seconds,
        samples=program_eval.samples,
        analysis=choice.analysis,
        planned=choice.planned,
        layer_errors=layer_errors,
        first_divergence=first_divergence,
        program_layers=program_layers,
        program_notes=notes,
        runtime=backend.host_runtime,
        warnings=backend.warnings(notes),
    )
    write_json_atomic(output.path("report.json"), report)
    write_html(output.path("report.html"), report)
    return BuildResult(
        recipe=recipe.name,
        target=target,
        plan=plan,
        scores=scores,
        sizes=sizes,
        lowered=lowered,
        qat=quantized.qat,
        timings=dict(stages.seconds),
        out_dir=None,
        report=report,
        reference_model=quantized.reference,
    )


def debug_layers(
    recipe: Recipe,
    target: Target,
    config: BuildConfig,
    plan: Plan,
    baseline: FloatBaseline,
    quantized: Quantized,
    lowered: Lowered,
) -> tuple[list, Any, dict[str, Any] | None]:
    """Per-layer numerics: the reference against float, and the program's own layers where the backend allows."""
    from edgeq.checks.debug import debug as layer_debug

    try:
        layer_errors, first_divergence = layer_debug(baseline.model, quantized.reference, recipe)
    except Exception:  # noqa: BLE001 - a diagnostic; e.g. a static-batch graph cannot take an eval batch
        layer_errors, first_divergence = [], None
    program_layers: dict[str, Any] | None = None
    layer_count = len(plan.layers)
    backend = get_backend(target.backend)
    if config.debug_program is None and layer_count > DEBUG_PROGRAM_LAYERS:
        program_layers = {
            "skipped": f"{layer_count} layers (the build reads them back by itself up to "
            f"{DEBUG_PROGRAM_LAYERS}); run `edgeq debug` on this directory, or build "
            "with --debug-program"
        }
    elif config.debug_program is not False and backend.per_op_partitioners(target) is None:
        from edgeq.checks.intermediates import debug_intermediates

        try:
            program_layers = {"intermediates": debug_intermediates(quantized.reference, recipe, target).to_json()}
        except EdgeqError:  # the backend cannot dump its intermediates
            program_layers = None
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not fail a build that validated
            program_layers = {"error": f"{type(exc).__name__}: {exc}"}
    elif config.debug_program is not False:
        from edgeq.checks.program_debug import debug_program

        try:
            program_layers = debug_program(
                baseline.model,
                quantized.reference,
                recipe,
                target,
                shipped=lowered.program,
                samples=config.debug_samples,
            ).to_json()
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not fail a build that validated
            program_layers = {"error": f"{type(exc).__name__}: {exc}"}
    return layer_errors, first_divergence, program_layers


def _score(model: Callable, recipe: Recipe, progress: Any, label: str) -> Evaluation:
    advance = None
    if progress is not None and hasattr(progress, "eval_start"):
        progress.eval_start(label)
        advance = progress.eval_advance
    try:
        return evaluate(model, recipe.eval_data(), recipe.metric, progress=advance, select=recipe.score_output)
    finally:
        if progress is not None and hasattr(progress, "eval_end"):
            progress.eval_end()
