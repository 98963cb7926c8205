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
from edgeq.backends import backend_of, load_target, quant_spec
from edgeq.checks.evaluate import Evaluation, agreement, evaluate
from edgeq.configs import DEBUG_PROGRAM_LAYERS, BuildConfig
from edgeq.errors import AccuracyError, EdgeqError, SdkMissingError
from edgeq.lower import Lowered, lower, lower_float
from edgeq.planning.analysis import Analysis, analyze
from edgeq.planning.plan import (
    OTHER_OPS,
    Plan,
    budget_in_bytes,
    layer_bytes,
    uniform_plan,
    validate_plan,
    weight_bytes,
)
from edgeq.planning.planner import Planned, make_plan
from edgeq.quant.convert import convert, prepare
from edgeq.quant.devices import check_device, init_distributed, seed_everything
from edgeq.quant.ptq import post_training_quantize
from edgeq.quant.qat import QATConfig, QATReport, run_qat, to_eval, world
from edgeq.recipe import Recipe, load_recipe
from edgeq.targets import Target
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
    #: which candidate the program was lowered from: "qat", "ptq" or "ptq+bias-correction"
    shipped: str = "qat"
    #: every quantized candidate measured: name -> {"holdout_loss", "metric"}; the build ships the
    #: lowest held-out loss (a slice of train_data(), never the eval data)
    candidates: dict[str, dict[str, builtins.float | None]] = dataclasses.field(default_factory=dict)
    #: what the choice was measured on
    selected_on: str = ""


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
    #: the lowered float program itself (host latency is measured against it)
    program: bytes = b""


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
        prepared = prepare(graph, quant_spec(plan, target, qat=True, ranges=config.ranges))
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
    stages = Stages()
    with stages("load"):
        recipe = load_recipe(recipe)
        target = load_target(config.target)
    qat = config.qat if config.qat is not None else QATConfig(**recipe.qat)
    config = dataclasses.replace(config, qat=dataclasses.replace(qat, device=check_device(qat.device)))
    rank = init_distributed(config.training.device)
    upstream.apply()
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
        program = lower_float(model, example_inputs, target)
    return FloatBaseline(
        model=model, example_inputs=example_inputs, graph=graph, program_bytes=len(program), program=program
    )


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
        analysis = analyze(baseline.model, recipe, target, seconds=config.analysis_seconds)
        overhead = None
        if config.size_budget is not None and not backend_of(target).float_baseline_overhead:
            overhead = program_overhead(recipe, target, config, baseline)
        planned = make_plan(
            analysis,
            target,
            baseline.program_bytes,
            max_drop=config.max_drop,
            size_budget=config.size_budget,
            outlier_ratio=config.outlier_ratio,
            intermediate_bits=config.training.intermediate_bits,
            program_overhead=overhead,
        )
    return PlanChoice(planned.plan, analysis, planned)


def program_overhead(recipe: Recipe, target: Target, config: BuildConfig, baseline: FloatBaseline) -> float:
    """Bytes a real program of this target carries beyond its weights: the default plan, PTQ, lowered."""
    plan = uniform_plan(baseline.model, target, example_inputs=baseline.example_inputs)
    reference = post_training_quantize(
        baseline.model, recipe, quant_spec(plan, target, qat=False), config.training, batches=2
    )
    program = lower(reference, baseline.example_inputs, target, allow_download=config.allow_sdk_download).program
    return max(0.0, len(program) - weight_bytes(plan, target))


def budget_bytes(config: BuildConfig, baseline: FloatBaseline) -> float:
    """--size-budget in bytes, against this build's float program."""
    assert config.size_budget is not None
    return budget_in_bytes(config.size_budget, baseline.program_bytes)


def check_lowered_size(config: BuildConfig, baseline: FloatBaseline, lowered: Lowered) -> None:
    if config.size_budget is None:
        return
    budget = budget_bytes(config, baseline)
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

    backend = backend_of(target)
    seed_everything(config.seed)
    config = dataclasses.replace(config, qat=dataclasses.replace(config.training, seed=config.seed))
    _announce(progress, "model")
    baseline = float_baseline(recipe, target, stages)
    choice = choose_plan(recipe, target, config, baseline, stages, progress)
    plan = choice.plan
    refined = None
    if config.plan is None and backend.plans_other_ops:
        with stages("analyze"):
            refined = refine_plan(recipe, target, config, choice, baseline)
    if config.plan is not None:
        # An edited plan may change the intermediate width (0 turns it off).
        config = dataclasses.replace(
            config, qat=dataclasses.replace(config.training, intermediate_bits=plan.intermediate_bits)
        )
    with stages("evaluate"):
        float_eval = _score(baseline.model, recipe, progress, "float model")
    _announce(progress, "qat")
    on_step = getattr(progress, "step", None) if progress is not None else None
    if progress is not None and hasattr(progress, "qat_start"):
        from edgeq.quant.qat import schedule

        progress.qat_start(schedule(recipe, config.training).steps)
    quantized = quantize(
        recipe,
        target,
        plan,
        config.training,
        stages,
        on_step,
        baseline.model,
        checkpoint=checkpoint,
        resume=config.resume,
    )
    if world()[0] != 0:
        return None
    _announce(progress, "evaluate")
    with stages("evaluate"):
        qat_eval = _score(quantized.fake_quant, recipe, progress, "QAT (simulated)")
        ref_eval = _score(quantized.reference, recipe, progress, "converted reference")
    qat_ref_eval, ptq_eval = ref_eval, None
    choice_made = choose_candidate(recipe, target, config, plan, baseline, quantized, stages, progress)
    candidates, shipped, selected_on = choice_made.measured, choice_made.shipped, choice_made.selected_on
    candidates["qat"]["metric"] = ref_eval.metric
    for name, reference in choice_made.references.items():
        if name == "qat":
            continue
        with stages("evaluate"):
            evaluation = _score(reference, recipe, progress, f"{name} reference")
        candidates[name]["metric"] = evaluation.metric
        if name == "ptq":
            ptq_eval = evaluation
        if name == shipped:
            ref_eval = evaluation
    if shipped != "qat":
        quantized = dataclasses.replace(quantized, reference=choice_made.references[shipped])
    fallback = accuracy_fallback(
        recipe,
        target,
        config,
        plan,
        baseline,
        choice,
        shipped,
        quantized.reference,
        float_eval.metric,
        ref_eval.metric,
        stages,
        progress,
        trained_graph=quantized.fake_quant if shipped == "qat" else None,
    )
    before_fallback = quantized.reference
    if fallback is not None and fallback.improved:
        plan = fallback.plan
        quantized = dataclasses.replace(quantized, reference=fallback.reference)
        ref_eval = fallback.evaluation
        shipped = f"{shipped}+float-fallback"
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
    from edgeq.checks.latency import host_latency_ms

    latency: dict[str, Any] = {}
    if backend.host_latency:
        with stages("latency"):
            latency = {
                "program_ms": host_latency_ms(lowered.program, baseline.example_inputs),
                "float_program_ms": host_latency_ms(baseline.program, baseline.example_inputs),
            }
            latency["ratio"] = latency["program_ms"] / latency["float_program_ms"]
    fallback_report: dict[str, Any] | None = None
    if fallback is not None:
        fallback_report = {
            "ranked_by": fallback.ranked_by,
            "weights": fallback.weights,
            "start_metric": fallback.start_metric,
            "steps": fallback.steps,
            "shipped": fallback.improved,
        }
        if fallback.improved:
            # The price of the float layers: the same build without them, lowered and timed.
            with stages("fallback"):
                without = lower(
                    before_fallback, baseline.example_inputs, target, allow_download=config.allow_sdk_download
                )
                fallback_report["program_bytes_without"] = len(without.program)
                if backend.host_latency:
                    fallback_report["program_ms_without"] = host_latency_ms(without.program, baseline.example_inputs)
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
        candidates=candidates,
        selected_on=selected_on,
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
        write_bundle(output.path("bundle"), lowered.program, man, vocab=_vocab(recipe))
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
        latency=latency,
        fallback=fallback_report,
        refined=refined,
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


@dataclass
class Fallback:
    """Layers sent back to float one at a time, by measured sensitivity, until the drop fits."""

    plan: Plan
    reference: torch.fx.GraphModule
    evaluation: Evaluation
    #: per step: the layer sent to float, the reference's metric after it, planned weight bytes
    steps: list[dict[str, Any]]
    improved: bool
    #: how the layers were ranked
    ranked_by: str
    start_metric: builtins.float
    #: whose weights each step quantized: "QAT-trained" or "float"
    weights: str = "float"


def _sensitivity_ranking(
    choice: PlanChoice, plan: Plan, baseline: FloatBaseline, reference: torch.fx.GraphModule, recipe: Recipe
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
    from edgeq.checks.debug import debug as layer_debug

    errors, _ = layer_debug(baseline.model, reference, recipe)
    # A layer's SQNR includes its inputs' error; the drop from the previous layer is its own.
    own, previous = {}, None
    for error in errors:
        own[error.layer] = (previous if previous is not None else error.sqnr_db) - error.sqnr_db
        previous = error.sqnr_db
    ranked = sorted((n for n in own if n in quantized), key=lambda n: -own[n])
    return ranked, "SQNR lost at the layer (quantized reference against float)"


def accuracy_fallback(
    recipe: Recipe,
    target: Target,
    config: BuildConfig,
    plan: Plan,
    baseline: FloatBaseline,
    choice: PlanChoice,
    shipped: str,
    reference: torch.fx.GraphModule,
    float_metric: builtins.float,
    metric: builtins.float,
    stages: Stages,
    progress: Any = None,
    trained_graph: torch.fx.GraphModule | None = None,
) -> Fallback | None:
    """When the shipped reference misses ``max_drop``, keep its most sensitive layers in float.

    As in NNCF's accuracy-aware quantization: one layer at a time, most sensitive first,
    each step re-quantized (calibration, plus bias correction when that shipped; QAT is not
    rerun) and measured on the evaluation data, until the drop fits or ``fallback_layers``
    layers are float. When QAT shipped (``trained_graph``, its trained graph), each step
    quantizes the float model holding the weights QAT learned, so a step keeps what training
    gained. The build
    ships the best step, and the report shows every step with its size (and, on a CPU
    target, latency) price.
    """
    floats = [name for name, spec in target.precisions.items() if spec.is_float]
    if not config.fallback_layers or not floats or float_metric - metric <= config.max_drop:
        return None
    from edgeq.quant.bias_correction import correct_bias
    from edgeq.quant.qat import schedule, trained_float

    trained = None
    if trained_graph is not None:  # only now: the copy costs a model's worth of memory
        tables = tuple(f"{entry.name}.weight" for entry in plan.layers if entry.kind == "embedding")
        trained = trained_float(baseline.model, trained_graph, keep=tables)
    _announce(progress, "fallback")
    with stages("fallback"):
        current = copy.deepcopy(plan)
        # Ranked on the reference that missed (the one that would have shipped).
        ranking, ranked_by = _sensitivity_ranking(choice, current, baseline, reference, recipe)
        every = schedule(recipe, config.training).holdout
        corrects_bias = "bias-correction" in shipped
        if corrects_bias:
            float_graph = capture_mod.capture_for_quantization(
                baseline.model, baseline.example_inputs, config.training.fold_bn
            )
            calibration = _calibration_inputs(recipe, every, config.bias_correction_samples)
        best: tuple[builtins.float, Plan, torch.fx.GraphModule, Evaluation] | None = None
        steps: list[dict[str, Any]] = []
        if config.size_budget is not None:
            # --size-budget is a hard limit: only layers whose float weights still fit it may fall back.
            budget = budget_bytes(config, baseline)
            overhead = baseline.program_bytes - 4.0 * sum(e.params for e in current.layers)
            room = budget - overhead - weight_bytes(current, target)
            fits = []
            for layer in ranking:
                entry = next(e for e in current.layers if e.name == layer)
                wide, now = target.precisions[target.narrowest_float(entry.kind)], target.precisions[entry.precision]
                extra = layer_bytes(entry.params, entry.channels, entry.kind, wide) - layer_bytes(
                    entry.params, entry.channels, entry.kind, now
                )
                if extra <= room:
                    fits.append(layer)
                    room -= extra
            ranking = fits
        for layer in ranking[: config.fallback_layers]:
            entry = next(e for e in current.layers if e.name == layer)
            float_name = target.narrowest_float(entry.kind)
            entry.precision = float_name
            entry.reason = (
                f"{float_name}: accuracy fallback, step {len(steps) + 1} (most sensitive quantized layer by "
                f"{ranked_by}); the plan missed --max-drop {config.max_drop:g}"
            )
            step_reference = post_training_quantize(
                trained if trained is not None else baseline.model,
                recipe,
                quant_spec(current, target, qat=False),
                config.training,
                config.ptq_batches or 16,
                every,
            )
            if corrects_bias:
                correct_bias(step_reference, float_graph, calibration)
            evaluation = _score(step_reference, recipe, progress, f"fallback: {layer} in float")
            steps.append(
                {
                    "layer": layer,
                    "metric": evaluation.metric,
                    "planned_weight_bytes": int(weight_bytes(current, target)),
                }
            )
            if best is None or evaluation.metric > best[0]:
                best = (evaluation.metric, copy.deepcopy(current), step_reference, evaluation)
            if float_metric - evaluation.metric <= config.max_drop:
                break
    if best is None:
        return None
    return Fallback(
        plan=best[1],
        reference=best[2],
        evaluation=best[3],
        steps=steps,
        improved=best[0] > metric,
        ranked_by=ranked_by,
        start_metric=metric,
        weights="QAT-trained" if trained is not None else "float",
    )


@dataclass
class CandidateChoice:
    references: dict[str, torch.fx.GraphModule]
    measured: dict[str, dict[str, Any]]
    shipped: str
    selected_on: str


def choose_candidate(
    recipe: Recipe,
    target: Target,
    config: BuildConfig,
    plan: Plan,
    baseline: FloatBaseline,
    quantized: Quantized,
    stages: Stages,
    progress: Any = None,
) -> CandidateChoice:
    """QAT, plain PTQ and PTQ with bias correction of the same plan; the lowest held-out loss ships.

    The loss is QAT's own (distillation from the float model by default), measured on the slice
    of train_data() held out of training, so the eval data never decides what ships. Without a
    held-out slice (one training batch, or ``holdout=0``) the training batches decide.
    """
    from edgeq.quant.bias_correction import correct_bias

    qat_config = config.training
    held, _, every, selected_on = _held_out(recipe, config, baseline)
    references: dict[str, torch.fx.GraphModule] = {"qat": quantized.reference}
    if config.ptq_batches:
        _announce(progress, "ptq")
        with stages("ptq"):
            ptq = post_training_quantize(
                baseline.model, recipe, quant_spec(plan, target, qat=False), qat_config, config.ptq_batches, every
            )
        references["ptq"] = ptq
        if config.bias_correction:
            with stages("bias correction"):
                calibration = _calibration_inputs(recipe, every, config.bias_correction_samples)
                float_graph = capture_mod.capture_for_quantization(
                    baseline.model, baseline.example_inputs, qat_config.fold_bn
                )
                corrected = copy.deepcopy(ptq)
                result = correct_bias(corrected, float_graph, calibration)
            if result.shifts:  # a backend that quantizes biases itself leaves nothing to correct
                references["ptq+bias-correction"] = corrected
    measured: dict[str, dict[str, Any]] = {}
    with stages("select"):
        for name, reference in references.items():
            measured[name] = {"holdout_loss": held.loss(reference), "metric": None}
    shipped = min(measured, key=lambda name: measured[name]["holdout_loss"])
    return CandidateChoice(references, measured, shipped, selected_on)


def _held_out(recipe: Recipe, config: BuildConfig, baseline: FloatBaseline) -> tuple[Any, list, int, str]:
    """The slice of train_data() held out of training that picks between candidates, its QAT loss
    (distillation from the float model unless --loss task), the hold-out stride, and what it is.
    Without a held-out slice (one training batch, or ``holdout=0``) the first training batches."""
    from edgeq.quant.qat import HeldOut, held_out_batches, schedule

    every = schedule(recipe, config.training).holdout
    batches = held_out_batches(recipe, every)
    selected_on = f"{len(batches)} held-out training batches"
    if not batches:
        batches = [b for _, b in zip(range(max(1, config.training.calibration_batches)), recipe.train_data())]
        selected_on = f"{len(batches)} training batches (no held-out slice)"
    teacher = baseline.model if config.training.loss != "task" else None
    return HeldOut(config.training.loss, recipe, batches, teacher, "cpu"), batches, every, selected_on


def _vocab(recipe: Recipe) -> bytes | None:
    if not recipe.text:
        return None
    path = Path(str(recipe.text.get("vocab_file", "")))
    if not path.is_file():
        raise EdgeqError(
            f"recipe {recipe.name}: text['vocab_file'] {str(path)!r} is not a file",
            "point it at the tokenizer's vocab.txt",
        )
    return path.read_bytes()


def refine_plan(
    recipe: Recipe, target: Target, config: BuildConfig, choice: PlanChoice, baseline: FloatBaseline
) -> dict[str, Any]:
    """Check a plan by quantizing it (PTQ on the training batches, scored on the held-out slice)
    and change what the measurement contradicts; sets ``choice.plan`` fields in place.

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
    """
    from edgeq.checks.evaluate import collect

    plan = choice.plan
    held, batches, every, _ = _held_out(recipe, config, baseline)
    measured: list[dict[str, Any]] = []

    def metric(model: Any) -> float:
        outputs, targets = collect(model, batches, select=recipe.score_output)
        return float(recipe.metric(outputs, targets))

    def measure(trial: Plan, what: str) -> dict[str, Any]:
        reference = post_training_quantize(
            baseline.model, recipe, quant_spec(trial, target, qat=False), config.training, 2, every
        )
        entry = {"what": what, "holdout_loss": held.loss(reference), "holdout_metric": metric(reference)}
        measured.append(entry)
        return entry

    float_metric = metric(baseline.model)
    losses: dict[str, float] = {}
    for option in OTHER_OPS:
        losses[option] = measure(dataclasses.replace(plan, other_ops=option), f"other ops {option}")["holdout_loss"]
    plan.other_ops = min(OTHER_OPS, key=lambda option: losses[option])  # ties keep "quantized"
    result: dict[str, Any] = {"other_ops": {"chosen": plan.other_ops, "holdout_loss": losses}}
    if choice.planned is None:
        result["measured"] = measured
        return result

    default = target.precisions[target.default_precision]
    swaps: dict[str, str] = {}
    for entry in plan.layers:
        if entry.precision != default.name or default.activations != "static":
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
    current = measured[-1] if plan.other_ops == OTHER_OPS[-1] else measured[0]
    if swaps:
        trial = copy.deepcopy(plan)
        for entry in trial.layers:
            if entry.name in swaps:
                entry.precision = swaps[entry.name]
        swapped = measure(
            trial, f"{len(swaps)} static {default.name} layers -> {', '.join(sorted(set(swaps.values())))}"
        )
        if swapped["holdout_loss"] < current["holdout_loss"]:
            for entry in plan.layers:
                if entry.name in swaps:
                    entry.precision = swaps[entry.name]
                    entry.reason = f"{swaps[entry.name]}: as small as {default.name}, lower measured held-out loss"
            current = swapped
        else:
            swaps = {}

    path = choice.planned.considered
    if config.size_budget is None and float_metric - current["holdout_metric"] > config.max_drop and len(path) > 1:

        def step_plan(k: int) -> Plan:
            trial = copy.deepcopy(plan)
            for entry in trial.layers:
                chosen = path[k].precisions.get(entry.name, entry.precision)
                entry.precision = swaps.get(entry.name, chosen) if chosen == default.name else chosen
            return trial

        # path[0] is the plan before any narrowing; the last step is the plan as planned.
        low, high = 0, len(path) - 1
        best = 0
        while low <= high:
            mid = (low + high) // 2
            trial_metric = measure(step_plan(mid), f"planner step {mid} of {len(path) - 1}")["holdout_metric"]
            if float_metric - trial_metric <= config.max_drop:
                best, low = mid, mid + 1
            else:
                high = mid - 1
        narrowed = step_plan(best)
        kept = {e.name: e.precision for e in narrowed.layers}
        for entry in plan.layers:
            if kept[entry.name] != entry.precision:
                entry.reason = (
                    f"{kept[entry.name]}: kept wider, the measured held-out drop of the narrower plan was over "
                    f"--max-drop {config.max_drop:g}"
                )
                entry.precision = kept[entry.name]
        for point in path:
            point.chosen = False
        path[best].chosen = True
        result["backed_off_to_step"] = best
    result["float_holdout_metric"] = float_metric
    result["measured"] = measured
    return result


def _calibration_inputs(recipe: Recipe, holdout: int, samples: int) -> tuple[torch.Tensor, ...]:
    """Up to ``samples`` training samples (held-out batches skipped), concatenated into one batch."""
    from edgeq.quant.qat import is_held_out
    from edgeq.recipe import as_tuple

    parts: list[tuple] = []
    seen = 0
    for index, (inputs, _) in enumerate(recipe.train_data()):
        if is_held_out(index, holdout):
            continue
        inputs = as_tuple(inputs)
        parts.append(inputs)
        seen += int(inputs[0].shape[0])
        if seen >= samples:
            break
    return tuple(torch.cat(column)[:samples] for column in zip(*parts))


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
    backend = backend_of(target)
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
        except EdgeqError as exc:  # this program cannot be read back layer by layer
            program_layers = {"skipped": str(exc)}
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
