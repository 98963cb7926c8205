"""``edgeq.build``: float model + recipe -> quantized, lowered, validated program.

Stages run in one direction: capture -> plan -> prepare -> QAT -> convert ->
lower -> validate -> package. Each stage is its own module; this one only
wires them together, times them and decides whether the result ships.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import capture as capture_mod
from .convert import convert, prepare
from .errors import AccuracyError, EdgeqError
from .evaluate import Evaluation, agreement, evaluate
from .lower import Lowered, lower
from .analysis import analyze
from .plan import Plan, uniform_plan, validate_plan, weight_bytes
from .planner import make_plan
from .qat import QATConfig, QATReport, run_qat, to_eval
from .quantizer import build_quantizer
from .recipe import Recipe, load_recipe
from .targets import Target, load_target
from .timing import Stages


# Largest model (planned layers) whose program a build debugs layer by layer unasked.
DEBUG_PROGRAM_LAYERS = 32


@dataclass
class BuildConfig:
    target: str | Path | Target = "android"
    out: str | Path | None = None
    #: an edited plan.json; None: every layer at ``precision``
    plan: str | Path | Plan | None = None
    #: uniform precision for every layer; None (and no plan): planned per layer
    precision: str | None = None
    #: planner constraint: program bytes (> 1) or a fraction of the float program (<= 1)
    size_budget: float | None = None
    #: planner: inputs with max |x| / p99.9 above this keep a wide precision
    outlier_ratio: float = 8.0
    qat: QATConfig = field(default_factory=QATConfig)
    #: fail when the .pte's metric falls more than this below float
    max_drop: float = 1.0
    seed: int = 0
    #: let ExecuTorch download the Qualcomm SDK when QNN_SDK_ROOT is unset
    allow_sdk_download: bool = False
    #: continue QAT from the checkpoint a killed build left beside the output directory
    resume: bool = False
    #: read the program's per-layer outputs back through ETDump (XNNPACK targets) for the
    #: report; None: when the model has at most DEBUG_PROGRAM_LAYERS planned layers (it
    #: lowers one delegate call per layer, about half a second each)
    debug_program: bool | None = None
    #: evaluation samples the per-layer program debugging runs
    debug_samples: int = 8


@dataclass
class Scores:
    float: float
    qat: float
    reference: float
    program: float
    agreement: dict[str, float]


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


def check_device(device: str) -> str:
    """The device QAT will train on, or a one-line error naming the fix.

    Under torchrun each rank takes the GPU of its LOCAL_RANK when given a bare
    ``cuda``, as DistributedDataParallel expects one device per process.
    """
    import os

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EdgeqError(f"unknown device {device!r}", "pass --device cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise EdgeqError(f"--device {device}: edgeq trains on cpu or cuda", "pass --device cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise EdgeqError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device",
                         "drop --device (QAT runs on the CPU), or run on a machine with a GPU and a CUDA build of torch")
    index = dev.index
    if index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        index = int(os.environ.get("LOCAL_RANK", "0"))
    index = torch.cuda.current_device() if index is None else index
    if index >= torch.cuda.device_count():
        raise EdgeqError(f"--device {device}: GPU {index} asked for, {torch.cuda.device_count()} visible",
                         "pass --device cuda (one GPU per torchrun process) or a cuda:N that exists")
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def init_distributed(device: str = "cpu") -> int:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); returns this rank."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, QATReport]:
    """capture -> prepare -> QAT -> convert; returns (fake-quant, reference, qat report)."""
    model = float_model if float_model is not None else recipe.model().eval()
    with stages("export"):
        graph = capture_mod.capture(model, recipe.example_inputs())
        if config.fold_bn:
            capture_mod.fold_batchnorm(graph)
    with stages("prepare"):
        prepared = prepare(graph, build_quantizer(plan, target, qat=True, ranges=config.ranges), qat=True)
    with stages("qat"):
        report = run_qat(prepared, recipe, config, on_step=on_step, checkpoint=checkpoint,
                         fingerprint=fingerprint(recipe, target, plan, config), resume=resume)
    with stages("convert"):
        # convert_pt2e rewrites the graph in place; keep the fake-quant model for scoring.
        reference = convert(copy.deepcopy(prepared))
    return to_eval(prepared), reference, report


def fingerprint(recipe: Recipe, target: Target, plan: Plan, config: QATConfig) -> str:
    """What a QAT checkpoint must match to be resumed."""
    import hashlib
    import json

    data = {"recipe": recipe.fingerprint, "target": target.name, "plan": plan.to_dict(), "qat": config.to_dict()}
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

    ``progress`` may provide ``step(i, loss)``, ``eval_start(label, n)`` and
    ``eval_advance(k)``, ``stage(name)`` (the CLI's rich display does).

    Under torchrun (``WORLD_SIZE`` > 1) QAT runs data-parallel; only rank 0
    converts, lowers and writes artifacts, and the other ranks return None.
    """
    # A private copy: the build fills in seeds and widths, the caller's config stays as given.
    config = copy.deepcopy(config or BuildConfig())
    for key, value in overrides.items():
        setattr(config, key, value)
    config.qat.device = check_device(config.qat.device)
    rank = init_distributed(config.qat.device)
    stages = Stages()
    with stages("load"):
        recipe = load_recipe(recipe)
        target = load_target(config.target)
    out_dir = Path(config.out) if config.out else Path("edgeq-out") / recipe.name
    checkpoint = checkpoint_path(out_dir)  # every rank resumes from rank 0's checkpoint
    from .package import OutputDir

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


def _build(recipe: Recipe, target: Target, config: BuildConfig, stages: Stages, progress: Any, output,
           checkpoint: Path) -> BuildResult | None:
    from .bundle import write_bundle
    from .package import sha256, write_bytes_atomic, write_json_atomic
    from .report import build_report, manifest, write_html
    from .validate import ProgramRunner

    seed_everything(config.seed)
    config.qat.seed = config.seed
    _announce(progress, "model")
    with stages("model"):
        try:
            float_model = recipe.model()
        except Exception as exc:
            raise EdgeqError(f"recipe model() raised {type(exc).__name__}: {exc}", "fix the recipe's model()") from exc
        if not isinstance(float_model, torch.nn.Module):
            raise EdgeqError(f"recipe model() returned {type(float_model).__name__}", "return a torch.nn.Module")
        float_model = float_model.eval()
        example_inputs = recipe.example_inputs()
    _announce(progress, "float")
    with stages("export"):
        # Checks the example inputs and export-ability first, with errors that name the cause.
        float_graph = capture_mod.capture(float_model, example_inputs, dynamic_batch=False)
    with stages("lower"):
        float_program = lower(float_model, example_inputs, load_target("android")).program
    analysis = planned = None
    if config.plan is not None:
        plan = config.plan if isinstance(config.plan, Plan) else Plan.load(config.plan)
        plan = validate_plan(copy.deepcopy(plan), float_model, target)
        # An edited plan may change the intermediate width (0 turns it off).
        config.qat.intermediate_bits = plan.intermediate_bits
    elif config.precision is not None:
        plan = uniform_plan(float_model, target, config.precision)
    else:
        _announce(progress, "analyze")
        with stages("analyze"):
            analysis = analyze(float_model, recipe, target)
            planned = make_plan(analysis, target, len(float_program), max_drop=config.max_drop,
                                size_budget=config.size_budget, outlier_ratio=config.outlier_ratio,
                                intermediate_bits=config.qat.intermediate_bits)
        plan = planned.plan
    with stages("evaluate"):
        float_eval = _score(float_model, recipe, progress, "float model")
    _announce(progress, "qat")
    on_step = getattr(progress, "step", None) if progress is not None else None
    if progress is not None and hasattr(progress, "qat_start"):
        progress.qat_start(config.qat.steps)
    fq_model, reference, qat_report = quantize(recipe, target, plan, config.qat, stages, on_step, float_model,
                                               checkpoint=checkpoint, resume=config.resume)
    from .qat import world

    if world()[0] != 0:
        return None
    _announce(progress, "evaluate")
    with stages("evaluate"):
        qat_eval = _score(fq_model, recipe, progress, "QAT (simulated)")
        ref_eval = _score(reference, recipe, progress, "converted reference")
    if target.backend == "qnn":
        from .errors import SdkMissingError
        from .qnn import ensure_sdk

        try:
            ensure_sdk(config.allow_sdk_download)
        except SdkMissingError as exc:
            raise SdkMissingError(
                f"quantized reference validated on the host: {ref_eval.metric:.2f} (float {float_eval.metric:.2f}, "
                f"QAT {qat_eval.metric:.2f}); {exc.cause}", exc.fix) from None
    _announce(progress, "lower")
    with stages("lower"):
        lowered = lower(reference, example_inputs, target, float_graph=float_graph,
                        allow_download=config.allow_sdk_download)
    if config.size_budget is not None:
        budget = config.size_budget * len(float_program) if config.size_budget <= 1 else config.size_budget
        if len(lowered.program) > budget:
            raise EdgeqError(
                f"model.pte is {len(lowered.program):,} bytes, over --size-budget {budget:,.0f}",
                "lower --size-budget slightly to leave the planner a margin, or edit plan.json to narrow more layers",
            )
    _announce(progress, "validate")
    with stages("validate"):
        runner = ProgramRunner(lowered.program)
        program_eval = _score(runner, recipe, progress, "model.pte (ExecuTorch runtime)")
    scores = Scores(
        float=float_eval.metric,
        qat=qat_eval.metric,
        reference=ref_eval.metric,
        program=program_eval.metric,
        agreement={
            "qat_vs_reference": agreement(qat_eval.outputs, ref_eval.outputs),
            "reference_vs_program": agreement(ref_eval.outputs, program_eval.outputs),
            "qat_vs_program": agreement(qat_eval.outputs, program_eval.outputs),
            "float_vs_program": agreement(float_eval.outputs, program_eval.outputs),
        },
    )
    sizes = {
        "float_program_bytes": len(float_program),
        "program_bytes": len(lowered.program),
        "planned_weight_bytes": int(weight_bytes(plan, target)),
    }
    _announce(progress, "package")
    with stages("package"):
        write_bytes_atomic(output.path("model.pte"), lowered.program)
        plan.save(output.path("plan.json"))
        man = manifest(recipe, target, config, runner.signature, example_inputs, float_model, sha256(lowered.program))
        write_json_atomic(output.path("manifest.json"), man)
        if analysis is not None:
            analysis.save(output.path("analysis.json"))
        write_bundle(output.path("bundle"), lowered.program, man)
        # The converted reference, for `edgeq validate` and numeric debugging.
        torch.export.save(capture_mod.export(reference, example_inputs), str(output.path("reference.pt2")))
    with stages("debug"):
        from .debug import debug as layer_debug

        try:
            layer_errors, first_divergence = layer_debug(float_model, reference, recipe)
        except Exception:  # noqa: BLE001 - a diagnostic; e.g. a static-batch graph cannot take an eval batch
            layer_errors, first_divergence = [], None
        program_layers = None
        layer_count = len(plan.layers)
        if config.debug_program is None and layer_count > DEBUG_PROGRAM_LAYERS:
            program_layers = {"skipped": f"{layer_count} layers (the build reads them back by itself up to "
                                         f"{DEBUG_PROGRAM_LAYERS}); run `edgeq debug` on this directory, or build "
                                         "with --debug-program"}
        elif config.debug_program is not False and target.backend == "xnnpack":
            from .program_debug import debug_program

            try:
                program_layers = debug_program(float_model, reference, recipe, target.backend,
                                               shipped=lowered.program, samples=config.debug_samples).to_json()
            except Exception as exc:  # noqa: BLE001 - a diagnostic must not fail a build that validated
                program_layers = {"error": f"{type(exc).__name__}: {exc}"}
    report = build_report(recipe, target, config, plan, scores, sizes, lowered, qat_report, stages.seconds,
                          samples=program_eval.samples, analysis=analysis, planned=planned,
                          layer_errors=layer_errors, first_divergence=first_divergence,
                          program_layers=program_layers)
    write_json_atomic(output.path("report.json"), report)
    write_html(output.path("report.html"), report)
    return BuildResult(
        recipe=recipe.name, target=target, plan=plan, scores=scores, sizes=sizes, lowered=lowered,
        qat=qat_report, timings=dict(stages.seconds), out_dir=None, report=report, reference_model=reference,
    )


def _score(model: Callable, recipe: Recipe, progress: Any, label: str) -> Evaluation:
    advance = None
    if progress is not None and hasattr(progress, "eval_start"):
        progress.eval_start(label)
        advance = progress.eval_advance
    try:
        return evaluate(model, recipe.eval_data(), recipe.metric, progress=advance)
    finally:
        if progress is not None and hasattr(progress, "eval_end"):
            progress.eval_end()
