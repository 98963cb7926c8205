"""The quantize stage: QAT of the plan, and the candidates it is measured against.

Every build quantizes one plan several ways (QAT; plain PTQ with the backend's
own calibration observers; PTQ with cross-layer equalization,
:mod:`edgeq.quant.equalization`; with activation ranges searched by their
quantization error, :mod:`edgeq.quant.clipping`; with empirical bias
correction; with weight scales and rounding fitted layer by layer,
:mod:`edgeq.quant.rounding`; rounding on top of the range methods that changed
something) and ships the candidate with the lowest held-out loss (:mod:`edgeq.quant.heldout`),
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
from edgeq.quant.clipping import search_clipping
from edgeq.quant.convert import convert, prepare
from edgeq.quant.equalization import EqualizationResult, equalize
from edgeq.quant.heldout import Selection, calibration_inputs
from edgeq.quant.ptq import calibrate
from edgeq.quant.qat import run_qat, schedule, to_eval
from edgeq.quant.rounding import RoundingConfig, fit_rounding

__all__ = [
    "METHODS", "CandidateChoice", "PTQMethods", "candidate_label", "choose_candidate", "complexity", "fingerprint",
    "fit_data", "methods_of", "quantize", "score_candidates",
]  # fmt: skip


def quantize(ctx: BuildContext, plan: Plan, baseline: FloatBaseline, checkpoint: Path | None = None) -> Quantized:
    """capture -> prepare -> QAT -> convert. QAT runs narrow layers at the plan's intermediate width first."""
    config = dataclasses.replace(ctx.training, intermediate_bits=plan.intermediate_bits)
    model, stages = baseline.model, ctx.stages
    with stages("export"):
        graph = capture_mod.capture_for_quantization(model, ctx.recipe.example_inputs(), config.fold_bn)
    with stages("prepare"):
        prepared = prepare(graph, ctx.spec(plan, qat=True))
    rates: dict[str, Any] = {}
    if config.lr_candidates > 1:
        ctx.announce("qat rate search")
        with stages("qat rate search"):
            config, rates = _search_rate(ctx, prepared, config, model)
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
    report.rate_search = rates
    with stages("convert"):
        # convert_pt2e rewrites the graph in place; keep the fake-quant model for scoring.
        reference = convert(copy.deepcopy(prepared))
    return Quantized(fake_quant=to_eval(prepared), reference=reference, qat=report)


def _search_rate(
    ctx: BuildContext, prepared: torch.fx.GraphModule, config: Any, model: torch.nn.Module
) -> tuple[Any, dict[str, Any]]:
    """The QAT config at the learning rate whose short run (a quarter of the schedule, from the
    same calibrated state) reached the lowest held-out loss; each rate's loss, for the report.
    Without held-out batches there is nothing to pick on: --lr stays."""
    plan = schedule(ctx.recipe, config)
    if not plan.holdout or not plan.steps:
        return config, {}
    short = max(1, plan.steps // 4)
    rates = [config.lr * 10 ** (-k / 2) for k in range(config.lr_candidates)]
    found: dict[str, float] = {}
    for rate in rates:
        trial = copy.deepcopy(prepared)
        # checked through the short run but never stopped early: each rate gets the same steps
        settings = dataclasses.replace(
            config, lr=rate, steps=short, lr_candidates=1, patience=1 << 30, checkpoint_every=0
        )
        report = run_qat(trial, ctx.recipe, settings, teacher=model if config.loss != "task" else None)
        trained = [loss for step, loss in report.holdout_losses if step > 0]
        found[f"{rate:.3g}"] = min(trained) if trained else float("inf")
    best = min(rates, key=lambda rate: found[f"{rate:.3g}"])
    return dataclasses.replace(config, lr=best), {"short_run_steps": short, "losses": found, "picked": best}


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
        spec = ctx.spec(plan, qat=False)
        methods = PTQMethods(ctx, baseline, selection.every)
        with ctx.stages("ptq"):
            calibrated = calibrate(baseline.model, ctx.recipe, spec, ctx.training, config.ptq_batches, selection.every)
            references["ptq"] = convert(copy.deepcopy(calibrated))
        changed: list[str] = []
        for method in _single_methods(config):
            made = methods.quantize(baseline.model, spec, f"ptq+{method}", calibrated)
            if made is not None:
                references[f"ptq+{method}"], fits[f"ptq+{method}"] = made
                changed.append(method)
        combined = _combination(changed)
        if combined is not None:
            made = methods.quantize(baseline.model, spec, combined, calibrated)
            if made is not None:
                references[combined], fits[combined] = made
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


#: what a PTQ candidate may add to calibration, in the order a candidate applies them: equalization
#: changes the float model, clipping the calibrated ranges, bias correction and rounding the
#: converted weights
METHODS = ("equalization", "clipping", "bias-correction", "rounding")


def _single_methods(config: Any) -> list[str]:
    enabled = {
        "equalization": config.equalization,
        "clipping": config.clipping,
        "bias-correction": config.bias_correction,
        "rounding": config.rounding,
    }
    return [method for method in METHODS if enabled[method]]


def _combination(changed: list[str]) -> str | None:
    """Weight rounding on top of the range methods that changed something: rounding fits each
    layer to its float output given the quantized network upstream, so it composes with them
    (bias correction does not: rounding already absorbs the mean error it would shift)."""
    stacked = [method for method in ("equalization", "clipping") if method in changed]
    if "rounding" not in changed or not stacked:
        return None
    return "+".join(["ptq", *stacked, "rounding"])


def methods_of(name: str) -> list[str]:
    """The methods a PTQ candidate's name lists ("ptq+clipping+rounding" -> clipping, rounding)."""
    parts = name.split("+")
    if parts[0] != "ptq" or any(part not in METHODS for part in parts[1:]):
        raise ValueError(f"not a PTQ candidate: {name}")
    return parts[1:]


class PTQMethods:
    """Quantizes a plan the way a PTQ candidate's name says ("ptq+clipping+rounding": calibrate,
    search the activation ranges, fit the weights' scales and rounding). The fallback's steps
    re-quantize the way the shipped candidate was, through the same object."""

    def __init__(self, ctx: BuildContext, baseline: FloatBaseline, every: int) -> None:
        self.ctx, self.baseline, self.every = ctx, baseline, every
        self._data: dict[int, tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...]]] = {}
        self._equalized: dict[int, tuple[torch.nn.Module, EqualizationResult]] = {}
        #: model id -> (the spec it was calibrated with, held so its id stays unique; the calibrated graph)
        self._calibrated: dict[int, tuple[Any, torch.fx.GraphModule]] = {}

    def data(self, model: torch.nn.Module) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...]]:
        """The float graph of ``model`` (which equalization may have rescaled) and the fit samples."""
        if id(model) not in self._data:
            self._data[id(model)] = fit_data(self.ctx, self.baseline, self.every, model)
        return self._data[id(model)]

    def equalized(self, model: torch.nn.Module) -> tuple[torch.nn.Module, EqualizationResult]:
        if id(model) not in self._equalized:
            with self.ctx.stages("equalization"):
                self._equalized[id(model)] = equalize(model, self.baseline.example_inputs)
        return self._equalized[id(model)]

    def quantize(
        self,
        model: torch.nn.Module,
        spec: Any,
        name: str,
        calibrated: torch.fx.GraphModule | None = None,
        keep_unchanged: bool = False,
    ) -> tuple[torch.fx.GraphModule, dict[str, Any]] | None:
        """The converted reference and each method's summary for the report, or None when a method
        changed nothing (the candidate would be a simpler one again), unless ``keep_unchanged``:
        then the reference comes back as the methods left it. ``calibrated``: ``model`` already
        calibrated with ``spec`` (copied, not changed)."""
        ctx, methods = self.ctx, methods_of(name)
        summary: dict[str, dict[str, Any]] = {}
        if "equalization" in methods:
            model, equalization = self.equalized(model)
            if not equalization.changed and not keep_unchanged:
                return None
            summary["equalization"] = {
                "pairs": len(equalization.pairs),
                "blocked_by_clamp": equalization.blocked_by_clamp,
            }
            calibrated = None
        if calibrated is None:
            cached = self._calibrated.get(id(model))
            if cached is None or cached[0] is not spec:  # the equalized model calibrates once per plan
                with ctx.stages("ptq"):
                    batches = ctx.config.ptq_batches or 16
                    cached = (spec, calibrate(model, ctx.recipe, spec, ctx.training, batches, self.every))
                self._calibrated[id(model)] = cached
            calibrated = cached[1]
        prepared = copy.deepcopy(calibrated)
        if "clipping" in methods:
            with ctx.stages("clipping search"):
                clipping = search_clipping(prepared)
            if not clipping.changed and not keep_unchanged:
                return None
            summary["clipping"] = clipping.summary()
        with ctx.stages("ptq"):
            reference = convert(prepared)
        if "bias-correction" in methods:
            with ctx.stages("bias correction"):
                result = correct_bias(reference, *self.data(model))
            if not result.shifts and not keep_unchanged:
                return None
            summary["bias-correction"] = {"layers": len(result.shifts), "samples": result.samples}
        if "rounding" in methods:
            ctx.announce("weight rounding")
            with ctx.stages("weight rounding"):
                fitted = fit_rounding(
                    reference, *self.data(model), RoundingConfig(iterations=ctx.config.rounding_iterations)
                )
            if not fitted.improved and not keep_unchanged:
                return None
            rows = fitted.layers.values()
            summary["rounding"] = {
                "layers": len(fitted.layers),
                "samples": fitted.samples,
                "output_mse_before": sum(r["before"] for r in rows),
                "output_mse_after": sum(r["after"] for r in rows),
                "weights_changed": sum(r["changed"] for r in rows) / max(1, len(fitted.layers)),
                "seconds": fitted.seconds,
            }
        return reference, summary


_LABELS = {
    "equalization": "cross-layer equalization",
    "clipping": "activation clipping search",
    "bias-correction": "bias correction",
    "rounding": "weight scales and rounding fitted per layer",
}


def candidate_label(name: str) -> str:
    """A candidate's name in words, for summaries and the report."""
    if name == "qat":
        return "QAT"
    try:
        methods = methods_of(name)
    except ValueError:
        return name
    return " + ".join(["PTQ" if methods else "PTQ, calibration only", *(_LABELS[m] for m in methods)])


def complexity(name: str) -> int:
    """How many moving parts a candidate has: plain PTQ 0, each PTQ method 1, QAT the most."""
    if name == "qat":
        return len(METHODS) + 1
    return len(methods_of(name))


def _simplest_as_good(samples: dict[str, torch.Tensor], lowest: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """The simplest candidate whose held-out loss is not distinguishable (95%, paired bootstrap over
    the held-out samples: ``samples``, per-sample losses by candidate) from the lowest one's; with
    each test, for the report."""
    order = {method: i for i, method in enumerate(METHODS)}
    simpler = sorted(
        (name for name in samples if complexity(name) < complexity(lowest)),
        key=lambda name: (complexity(name), [order[m] for m in methods_of(name)] if name != "qat" else []),
    )
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
    ctx: BuildContext, baseline: FloatBaseline, every: int, model: torch.nn.Module | None = None
) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...]]:
    """What bias correction and weight rounding fit a reference to: the float graph of ``model``
    (the baseline's unless given) as quantization captures it, and training samples (held-out
    batches skipped)."""
    model = baseline.model if model is None else model
    float_graph = capture_mod.capture_for_quantization(model, baseline.example_inputs, ctx.training.fold_bn)
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
