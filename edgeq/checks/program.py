"""The validate stage: the lowered program in ExecuTorch's runtime, scored beside every model before it,
and its host latency (and the price of any layers the accuracy fallback kept in float)."""

from __future__ import annotations

import builtins
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgeq.checks.evaluate import Evaluation, agreement, is_classifier_output, sqnr_db
from edgeq.checks.latency import host_latency_ms
from edgeq.checks.stats import interval, paired, verdict
from edgeq.context import BuildContext, FloatBaseline, Quantized
from edgeq.errors import EdgeqError, SdkMissingError
from edgeq.lower import Lowered, lower
from edgeq.planning.plan import Plan, weight_bytes
from edgeq.recipe import Recipe, as_tuple, output_leaves

#: seconds the report's intervals and paired tests may spend resampling a slow metric, all of them
#: together (COCO mAP re-accumulates per resample: 22 resampled models cost over 2 minutes at
#: 1,000 resamples each on 2 cores); each still gets stats.MIN_RESAMPLES, and says how many it used
UNCERTAINTY_SECONDS = 30.0

__all__ = [
    "Evaluations", "Scores", "ensure_sdk", "evaluate_models", "fallback_price", "host_latency", "program_sizes",
    "scores", "validate_program",
]  # fmt: skip


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
    #: which candidate the program was lowered from (edgeq.quant.candidates)
    shipped: str = "qat"
    #: every quantized candidate measured: name -> {"holdout_loss", "metric"}; the build ships the
    #: lowest held-out loss (a slice of train_data(), never the eval data)
    candidates: dict[str, dict[str, builtins.float | None]] = dataclasses.field(default_factory=dict)
    #: what the choice was measured on
    selected_on: str = ""
    #: the candidate with the lowest held-out loss (a simpler one ships when the two cannot be told apart)
    lowest: str = ""
    #: model -> its metric with a 95% interval over the evaluation samples (edgeq.checks.stats)
    intervals: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: "a_vs_b" -> metric(a) - metric(b) on the same samples, its interval and paired test
    paired: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: what the measured drop says about --max-drop, in one sentence
    verdict: str = ""
    #: SQNR (dB) of the scored output, "a_vs_b": b against a (every model, classifier or not)
    sqnr_db: dict[str, builtins.float] = dataclasses.field(default_factory=dict)
    #: a multi-output program: every output's SQNR against the float model, the scored one marked
    every_output_sqnr: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclass
class Evaluations:
    """Each model of the build on the evaluation data (reported only)."""

    float: Evaluation
    qat: Evaluation
    qat_reference: Evaluation
    #: the reference that ships (after candidate selection and the accuracy fallback)
    reference: Evaluation
    program: Evaluation | None = None
    #: every quantized candidate's converted reference, by candidate name
    candidates: dict[str, Evaluation] = dataclasses.field(default_factory=dict)
    #: a multi-output program: each output's SQNR against the float model (the scored one marked)
    every_output: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def evaluate_models(ctx: BuildContext, float_eval: Evaluation, quantized: Quantized) -> Evaluations:
    """QAT's fake-quant model and its converted reference on the evaluation data (reported only)."""
    ctx.announce("evaluate")
    with ctx.stages("evaluate"):
        qat = ctx.score(quantized.fake_quant, "QAT (simulated)")
        reference = ctx.score(quantized.reference, "converted reference")
    return Evaluations(float=float_eval, qat=qat, qat_reference=reference, reference=reference)


def validate_program(ctx: BuildContext, lowered: Lowered, evaluations: Evaluations, baseline: FloatBaseline) -> Any:
    """Score the program in the backend's host runtime on the recipe's scored output; with several
    outputs, every output's SQNR against the float model too, from the same program run. Returns
    the runner (its signature goes in the manifest)."""
    ctx.announce("validate")
    label = "model.pte (ExecuTorch runtime)"
    with ctx.stages("validate"):
        runner = ctx.backend.runner(lowered.program)
        runner.scored = baseline.scored_output
        if len(runner.signature.outputs) == 1:
            evaluations.program = ctx.score(runner, label)
            return runner
        every: list[list[torch.Tensor]] = []

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            outputs = runner.outputs(*inputs)
            every.append([t.float() for t in outputs])
            return outputs[runner.scored]

        evaluations.program = ctx.score(run, label)
        evaluations.every_output = every_output_sqnr(ctx.recipe, every, baseline.model, runner.scored)
    return runner


@torch.no_grad()
def every_output_sqnr(
    recipe: Recipe, program_parts: list[list[torch.Tensor]], model: torch.nn.Module, scored: int
) -> list[dict[str, Any]]:
    """Each of the program's outputs (``program_parts``: per evaluation batch, every output) against
    the float model's on the same batches: SQNR in dB."""
    float_parts = [[t.float() for t in output_leaves(model(*as_tuple(inputs)))] for inputs, _ in recipe.eval_data()]
    rows = []
    for i, (ours, theirs) in enumerate(zip(zip(*program_parts), zip(*float_parts))):
        program_out, float_out = torch.cat(ours), torch.cat(theirs)
        rows.append(
            {
                "output": f"output_{i}",
                "shape": list(program_out.shape[1:]),
                "float_vs_program_db": sqnr_db(float_out, program_out),
                "scored": i == scored,
            }
        )
    return rows


def arm_preflight(ctx: BuildContext) -> None:
    """Before minutes of work: the Arm check a build asked for can run (a one-line error if not)."""
    if ctx.config.arm_cpu is None:
        return
    from edgeq.checks import arm64

    if not ctx.backend.arm_cpu_runtime:
        raise EdgeqError(
            f"--arm-cpu runs CPU programs; target {ctx.target.name} lowers to {ctx.backend.title}",
            "drop --arm-cpu, or build for a CPU target (android)",
        )
    arm64.check_cpu(ctx.config.arm_cpu)
    arm64.find_setup()


def arm_kernels(ctx: BuildContext, lowered: Lowered, scored: int = 0) -> dict[str, Any] | None:
    """The program on Arm kernels (qemu) against the x86 runtime, on the evaluation data."""
    if ctx.config.arm_cpu is None:
        return None
    import tempfile

    from edgeq.checks import arm64

    ctx.announce("arm64")
    with ctx.stages("arm64"), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pte"
        path.write_bytes(lowered.program)
        return arm64.compare(path, ctx.recipe, ctx.config.arm_cpu, scored=scored).to_dict()


def scores(
    evaluations: Evaluations,
    candidates: dict[str, dict[str, Any]],
    shipped: str,
    selected_on: str,
    metric: Callable,
    max_drop: float,
    lowest: str = "",
) -> Scores:
    program, qat, qat_ref = evaluations.program, evaluations.qat, evaluations.qat_reference
    assert program is not None
    result = Scores(
        float=evaluations.float.metric,
        qat=qat.metric,
        reference=evaluations.reference.metric,
        program=program.metric,
        ptq=evaluations.candidates["ptq"].metric if "ptq" in evaluations.candidates else None,
        qat_reference=qat_ref.metric,
        shipped=shipped,
        candidates=candidates,
        selected_on=selected_on,
        lowest=lowest,
        agreement={
            "qat_vs_reference": agreement(qat.outputs, qat_ref.outputs),
            "reference_vs_program": agreement(evaluations.reference.outputs, program.outputs),
            "qat_vs_program": agreement(qat.outputs, program.outputs),
            "float_vs_program": agreement(evaluations.float.outputs, program.outputs),
        }
        if is_classifier_output(program.outputs)
        else {},
        sqnr_db={
            "reference_vs_program": sqnr_db(evaluations.reference.outputs, program.outputs),
            "float_vs_program": sqnr_db(evaluations.float.outputs, program.outputs),
        },
        every_output_sqnr=evaluations.every_output,
    )
    _uncertainty(result, evaluations, metric, max_drop)
    return result


def _uncertainty(result: Scores, evaluations: Evaluations, metric: Callable, max_drop: float) -> None:
    """Intervals for each model and paired tests for the pairs a reader compares; a bootstrapped
    metric shares UNCERTAINTY_SECONDS among them all (each pair of candidates adds a test)."""
    targets = evaluations.float.targets
    models = {"float": evaluations.float, "qat": evaluations.qat, "reference": evaluations.reference}
    models["program"] = evaluations.program  # type: ignore[assignment]
    candidate_pairs = {"float_vs_program": (evaluations.float, evaluations.program)}
    candidate_pairs["reference_vs_program"] = (evaluations.reference, evaluations.program)
    names = sorted(evaluations.candidates)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            candidate_pairs[f"{a}_vs_{b}"] = (evaluations.candidates[a], evaluations.candidates[b])
    pairs = {name: (a, b) for name, (a, b) in candidate_pairs.items() if a is not None and b is not None}
    each = UNCERTAINTY_SECONDS / (len(models) + 2 * len(pairs))  # a paired test resamples two models
    result.intervals = {
        name: interval(metric, e.outputs, targets, seconds=each).to_dict() for name, e in models.items()
    }
    tests = {name: paired(metric, a.outputs, b.outputs, targets, seconds=2 * each) for name, (a, b) in pairs.items()}
    result.paired = {name: test.to_dict() for name, test in tests.items()}
    result.verdict = verdict(tests["float_vs_program"], max_drop)


def host_latency(ctx: BuildContext, lowered: Lowered, baseline: FloatBaseline) -> dict[str, Any]:
    """Median host latency of the program and of the float program (empty where the host runs a simulator)."""
    if not ctx.backend.host_latency:
        return {}
    with ctx.stages("latency"):
        latency = {
            "program_ms": host_latency_ms(lowered.program, baseline.example_inputs),
            "float_program_ms": host_latency_ms(baseline.program, baseline.example_inputs),
        }
    latency["ratio"] = latency["program_ms"] / latency["float_program_ms"]
    return latency


def fallback_price(ctx: BuildContext, without: torch.fx.GraphModule, baseline: FloatBaseline) -> dict[str, Any]:
    """The price of the fallback's float layers: the same build without them, lowered and timed."""
    with ctx.stages("fallback"):
        lowered = lower(without, baseline.example_inputs, ctx.target, allow_download=ctx.config.allow_sdk_download)
        price: dict[str, Any] = {"program_bytes_without": len(lowered.program)}
        if ctx.backend.host_latency:
            price["program_ms_without"] = host_latency_ms(lowered.program, baseline.example_inputs)
    return price


def ensure_sdk(ctx: BuildContext, evals: Evaluations) -> None:
    """Lowering for this target needs its SDK here; say what the host already measured when it is missing."""
    try:
        ctx.backend.ensure_sdk(ctx.config.allow_sdk_download)
    except SdkMissingError as exc:
        raise SdkMissingError(
            f"quantized reference validated on the host: {evals.reference.metric:.2f} "
            f"(float {evals.float.metric:.2f}, QAT {evals.qat.metric:.2f}); {exc.cause}",
            exc.fix,
        ) from None


def program_sizes(ctx: BuildContext, plan: Plan, baseline: FloatBaseline, lowered: Lowered) -> dict[str, int]:
    return {
        "float_program_bytes": baseline.program_bytes,
        "program_bytes": len(lowered.program),
        "planned_weight_bytes": int(weight_bytes(plan, ctx.target)),
    }
