"""The quantize stage: QAT of the plan, and the candidates it is measured against.

Every build quantizes one plan several ways (QAT; plain PTQ with the backend's
own calibration observers; PTQ with empirical bias correction; PTQ with weight
scales and rounding fitted layer by layer, :mod:`edgeq.quant.rounding`) and
ships the candidate with the lowest held-out loss (:mod:`edgeq.quant.heldout`),
or a simpler one the held-out samples cannot tell from it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgeq import capture as capture_mod
from edgeq.checks.stats import mean_interval
from edgeq.context import BuildContext, FloatBaseline, Quantized
from edgeq.planning.plan import Plan
from edgeq.quant.bias_correction import correct_bias
from edgeq.quant.convert import convert, prepare
from edgeq.quant.heldout import Selection, calibration_inputs
from edgeq.quant.ptq import post_training_quantize
from edgeq.quant.qat import run_qat, schedule, to_eval
from edgeq.quant.rounding import RoundingConfig, fit_rounding

__all__ = [
    "SIMPLICITY", "CandidateChoice", "PTQMethods", "choose_candidate", "fingerprint", "fit_data", "quantize",
    "score_candidates",
]  # fmt: skip


def quantize(ctx: BuildContext, plan: Plan, baseline: FloatBaseline, checkpoint: Path | None = None) -> Quantized:
    """capture -> prepare -> QAT -> convert. QAT runs narrow layers at the plan's intermediate width first."""
    config = dataclasses.replace(ctx.training, intermediate_bits=plan.intermediate_bits)
    model, stages = baseline.model, ctx.stages
    with stages("export"):
        graph = capture_mod.capture_for_quantization(model, ctx.recipe.example_inputs(), config.fold_bn)
    with stages("prepare"):
        prepared = prepare(graph, ctx.spec(plan, qat=True))
    ctx.announce("qat")
    ctx.progress.qat_start(schedule(ctx.recipe, config).steps)
    with stages("qat"):
        report = run_qat(
            prepared,
            ctx.recipe,
            config,
            teacher=model if config.loss != "task" else None,
            on_step=ctx.progress.step,
            checkpoint=checkpoint,
            fingerprint=fingerprint(ctx, plan),
            resume=ctx.config.resume,
        )
    with stages("convert"):
        # convert_pt2e rewrites the graph in place; keep the fake-quant model for scoring.
        reference = convert(copy.deepcopy(prepared))
    return Quantized(fake_quant=to_eval(prepared), reference=reference, qat=report)


def fingerprint(ctx: BuildContext, plan: Plan) -> str:
    """What a QAT checkpoint must match to be resumed."""
    data: dict[str, Any] = {
        "recipe": ctx.recipe.fingerprint,
        "target": ctx.target.name,
        "plan": plan.to_dict(),
        "qat": dataclasses.replace(ctx.training, intermediate_bits=plan.intermediate_bits).to_dict(),
    }
    data["qat"].pop("checkpoint_every", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class CandidateChoice:
    references: dict[str, torch.fx.GraphModule]
    #: name -> {"holdout_loss", "metric"}; the metric (evaluation data) is filled in for the report
    measured: dict[str, dict[str, Any]]
    shipped: str
    selected_on: str
    #: the candidate with the lowest held-out loss (``shipped`` is simpler when the two cannot be told apart)
    lowest: str = ""


def choose_candidate(
    ctx: BuildContext, plan: Plan, baseline: FloatBaseline, quantized: Quantized, selection: Selection
) -> CandidateChoice:
    """QAT and the PTQ candidates of the same plan; the lowest held-out loss ships, or a simpler
    candidate that the held-out samples cannot tell from it.

    The loss is QAT's own (distillation from the float model by default), measured on the slice
    of train_data() held out of training, so the eval data never decides what ships. Without a
    held-out slice (one training batch, or ``holdout=0``) the training batches decide.
    """
    config = ctx.config
    references: dict[str, torch.fx.GraphModule] = {"qat": quantized.reference}
    fits: dict[str, dict[str, Any]] = {}
    if config.ptq_batches:
        ctx.announce("ptq")
        with ctx.stages("ptq"):
            spec = ctx.spec(plan, qat=False)
            ptq = post_training_quantize(
                baseline.model, ctx.recipe, spec, ctx.training, config.ptq_batches, selection.every
            )
        references["ptq"] = ptq
        methods = PTQMethods(ctx, baseline, selection.every)
        for name in _ptq_candidates(config):
            candidate = copy.deepcopy(ptq)
            fit = methods.apply(candidate, name)
            if fit is not None:
                references[name], fits[name] = candidate, fit
    with ctx.stages("select"):
        measures = {name: selection.held.loss_and_samples(reference) for name, reference in references.items()}
        losses = {name: loss for name, (loss, _) in measures.items()}
        lowest = min(losses, key=lambda name: losses[name])
        shipped, evidence = _simplest_as_good({name: samples for name, (_, samples) in measures.items()}, lowest)
    measured: dict[str, dict[str, Any]] = {
        name: {"holdout_loss": loss, "metric": None} for name, loss in losses.items()
    }
    for name, test in evidence.items():
        measured[name]["vs_lowest"] = test
    for name, test in _against(measures, shipped).items():
        measured[name]["vs_shipped"] = test
    for name, fit in fits.items():
        measured[name]["fit"] = fit
    return CandidateChoice(references, measured, shipped, selection.selected_on, lowest)


def _ptq_candidates(config: Any) -> list[str]:
    names = []
    if config.bias_correction:
        names.append("ptq+bias-correction")
    if config.rounding:
        names.append("ptq+rounding")
    return names


class PTQMethods:
    """What a PTQ candidate adds to plain PTQ, applied to a converted reference in place: the
    candidate's name says which ("ptq+bias-correction", "ptq+rounding"). The fallback's steps
    re-quantize the way the shipped candidate was, through the same object."""

    def __init__(self, ctx: BuildContext, baseline: FloatBaseline, every: int) -> None:
        self.ctx, self.baseline, self.every = ctx, baseline, every
        self._data: tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...]] | None = None

    def data(self) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...]]:
        if self._data is None:
            self._data = fit_data(self.ctx, self.baseline, self.every)
        return self._data

    def apply(self, reference: torch.fx.GraphModule, name: str) -> dict[str, Any] | None:
        """The method's summary for the report, or None when it changed nothing (the backend
        quantizes biases itself; no layer has per-channel integer weights)."""
        if name.endswith("+bias-correction"):
            with self.ctx.stages("bias correction"):
                result = correct_bias(reference, *self.data())
            return {"layers": len(result.shifts), "samples": result.samples} if result.shifts else None
        if name.endswith("+rounding"):
            self.ctx.announce("weight rounding")
            with self.ctx.stages("weight rounding"):
                config = RoundingConfig(iterations=self.ctx.config.rounding_iterations)
                fitted = fit_rounding(reference, *self.data(), config)
            if not fitted.improved:
                return None
            rows = fitted.layers.values()
            return {
                "layers": len(fitted.layers),
                "samples": fitted.samples,
                "output_mse_before": sum(r["before"] for r in rows),
                "output_mse_after": sum(r["after"] for r in rows),
                "weights_changed": sum(r["changed"] for r in rows) / max(1, len(fitted.layers)),
                "seconds": fitted.seconds,
            }
        return {}


#: candidates from the fewest moving parts to the most; a simpler one ships when the held-out data
#: cannot tell it from the lowest-loss one
SIMPLICITY = ("ptq", "ptq+bias-correction", "ptq+rounding", "qat")


def _simplest_as_good(samples: dict[str, torch.Tensor], lowest: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """The simplest candidate whose held-out loss is not distinguishable (95%, paired bootstrap over
    the held-out samples: ``samples``, per-sample losses by candidate) from the lowest one's; with
    each test, for the report."""
    before = SIMPLICITY[: SIMPLICITY.index(lowest)] if lowest in SIMPLICITY else ()
    simpler = [name for name in before if name in samples]
    if not simpler:
        return lowest, {}
    evidence = {name: _loss_difference(samples[name], samples[lowest]) for name in simpler}
    for name in simpler:
        if evidence[name]["low"] <= 0.0:
            return name, evidence
    return lowest, evidence


def _against(measures: dict[str, tuple[float, torch.Tensor]], shipped: str) -> dict[str, dict[str, Any]]:
    """How sure the choice is: each other candidate's mean held-out loss minus the shipped one's,
    with its 95% paired-bootstrap interval over the same held-out samples."""
    base = measures[shipped][1]
    return {name: _loss_difference(samples, base) for name, (_, samples) in measures.items() if name != shipped}


def _loss_difference(losses: torch.Tensor, base: torch.Tensor) -> dict[str, Any]:
    """Mean per-sample held-out loss of ``losses`` minus ``base`` on the same samples, with its 95%
    paired-bootstrap interval."""
    difference, low, high = mean_interval(losses - base)
    return {"difference": difference, "low": low, "high": high, "samples": int(base.shape[0])}


def fit_data(
    ctx: BuildContext, baseline: FloatBaseline, every: int
) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...]]:
    """What bias correction and weight rounding fit a reference to: the float graph as quantization
    captures it, and training samples (held-out batches skipped)."""
    float_graph = capture_mod.capture_for_quantization(baseline.model, baseline.example_inputs, ctx.training.fold_bn)
    return float_graph, calibration_inputs(ctx.recipe, every, ctx.config.fit_samples)


def score_candidates(ctx: BuildContext, made: CandidateChoice, evals: Any) -> None:
    """Each candidate's evaluation metric, for the report (the choice was made before, on held-out data).
    ``evals``: the build's edgeq.checks.program.Evaluations, completed in place."""
    made.measured["qat"]["metric"] = evals.qat_reference.metric
    evals.candidates["qat"] = evals.qat_reference
    for name, reference in made.references.items():
        if name == "qat":
            continue
        with ctx.stages("evaluate"):
            evaluation = ctx.score(reference, f"{name} reference")
        made.measured[name]["metric"] = evaluation.metric
        evals.candidates[name] = evaluation
        if name == made.shipped:
            evals.reference = evaluation
