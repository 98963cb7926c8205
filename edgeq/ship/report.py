"""The build's report (JSON and a self-contained HTML page) and its manifest."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeq.backends import backend_of
from edgeq.quant.candidates import candidate_label
from edgeq.ship.package import versions, write_bytes_atomic
from edgeq.ship.templating import manifest_schema, render

MANIFEST_SCHEMA = 1


#: report.json's layout version; bump when a field changes meaning or disappears
#: (4: the accuracy fallback reports held-out metrics: start_metric, float_metric, steps[].holdout_metric)
REPORT_SCHEMA = 4


def check_manifest(manifest: dict[str, Any]) -> None:
    """Raise ValueError naming the first field that does not follow manifest.schema.json."""
    import jsonschema

    try:
        jsonschema.validate(manifest, manifest_schema())
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ValueError(f"manifest field {where}: {exc.message}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def manifest(
    recipe: Any,
    target: Any,
    config: Any,
    signature: Any,
    baseline: Any,
    program_sha256: str,
    program_notes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``signature``: the loaded program's ProgramSignature (its output shapes and dtypes);
    ``baseline``: the build's FloatBaseline (the float model, its example inputs, the scored output)."""
    example_inputs = baseline.example_inputs
    names = _input_names(baseline.model, len(example_inputs))
    return {
        "schema": MANIFEST_SCHEMA,
        "model": "model.pte",
        "sha256": program_sha256,
        "recipe": {"name": recipe.name, "source": recipe.source, "sha256": recipe.fingerprint},
        "target": {"name": target.name, "backend": target.backend, "chipset": target.chipset},
        "inputs": [
            {"name": name, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
            for name, t in zip(names, example_inputs)
        ],
        "outputs": [
            {"name": f"output_{i}", "shape": list(shape), "dtype": dtype}
            for i, (shape, dtype) in enumerate(signature.outputs)
        ],
        # which of the outputs the build scored and gated on (the Kotlin classes read that one)
        "scored_output": baseline.scored_output,
        "preprocessing": recipe.preprocessing,
        **({"text": text_manifest(recipe.text)} if getattr(recipe, "text", None) else {}),
        **({"postprocessing": post_manifest(recipe.postprocessing)} if getattr(recipe, "postprocessing", None) else {}),
        **({"features": recipe.features.manifest()} if getattr(recipe, "features", None) else {}),
        "labels": recipe.labels,
        "versions": versions(),
        # Everything else that determines the program's bytes.
        "build": {
            "seed": config.seed,
            "precision": config.precision,
            "plan": str(config.plan) if config.plan is not None else None,
            "qat": config.training.to_dict(),
            "python": platform.python_version(),
        },
        **({"program": program_notes} if program_notes else {}),
    }


def post_manifest(decoder: Any) -> dict[str, Any]:
    """What the app runs on the output (a detector's decode and NMS, a segmenter's argmax), as the
    bundle's Detections.java or Segmentation.java reads it."""
    return {"task": getattr(decoder, "task", "detection"), **decoder.manifest()}


def text_manifest(text: dict[str, Any]) -> dict[str, Any]:
    """The recipe's tokenizer facts as the app sees them: the vocabulary is the bundle's vocab.txt."""
    public = {key: value for key, value in text.items() if key != "vocab_file"}
    public["vocab"] = "vocab.txt"
    return public


def _input_names(model: torch.nn.Module, count: int) -> list[str]:
    import inspect

    try:
        params = [
            p
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        names = [p.name for p in params][:count]
    except (TypeError, ValueError):
        names = []
    return names + [f"input_{i}" for i in range(len(names), count)]


@dataclass
class BuildRecord:
    """Everything a build's report is written from (the stages' results)."""

    recipe: Any
    target: Any
    config: Any
    plan: Any
    scores: Any
    sizes: dict[str, int]
    lowered: Any
    qat_report: Any
    timings: dict[str, float]
    samples: int
    analysis: Any = None
    planned: Any = None
    #: edgeq.checks.numerics.Numerics; None: not measured
    numerics: Any = None
    program_notes: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    fallback: dict[str, Any] | None = None
    refined: dict[str, Any] | None = None
    #: narrowings after the lowered program missed --size-budget (edgeq.planning.budget)
    narrowed: list[dict[str, Any]] = field(default_factory=list)
    #: the program on Arm kernels under emulation (edgeq.checks.arm64); None: not run
    arm: dict[str, Any] | None = None


def build_report(record: BuildRecord) -> dict[str, Any]:
    r = record
    backend = backend_of(r.target)
    numerics = r.numerics
    return {
        "schema_version": REPORT_SCHEMA,
        "recipe": r.recipe.name,
        "target": r.target.name,
        "backend": r.target.backend,
        "backend_title": backend.title,
        "runtime": backend.host_runtime,
        "warnings": list(backend.warnings(r.program_notes)) + list(r.qat_report.warnings),
        "program": dict(r.program_notes),
        "samples": r.samples,
        "accuracy": _accuracy(r),
        "agreement": r.scores.agreement,
        "output_sqnr_db": r.scores.sqnr_db,
        "every_output_sqnr_db": r.scores.every_output_sqnr,
        "latency": dict(r.latency),
        "arm_kernels": r.arm,
        "fallback": r.fallback,
        "size_budget_narrowing": r.narrowed,
        "size": {
            **r.sizes,
            "ratio": r.sizes["program_bytes"] / r.sizes["float_program_bytes"]
            if r.sizes["float_program_bytes"]
            else None,
        },
        "delegation": _delegation(r.lowered.delegation),
        "plan": [asdict(layer) for layer in r.plan.layers],
        "float_ops": list(r.plan.float_ops),
        "wide_ops": dict(r.plan.wide_ops),
        #: ops between planned layers: quantized or float, and the held-out losses that decided it
        "other_ops": {"chosen": r.plan.other_ops, **((r.refined or {}).get("other_ops") or {})},
        #: the plan quantized (PTQ) and measured on the held-out slice before training, and what changed
        "plan_checks": r.refined,
        "qat": _qat(r),
        "analysis": r.analysis.to_dict() if r.analysis is not None else None,
        "planner": _planner(r),
        "layer_sqnr": {
            "reference_vs_float_db": {e.layer: e.sqnr_db for e in (numerics.layer_errors if numerics else [])},
            "first_divergence": numerics.first_divergence.layer if numerics and numerics.first_divergence else None,
        },
        "program_layers": numerics.program_layers if numerics is not None else None,
        "timings": r.timings,
        "versions": versions(),
    }


def _accuracy(r: BuildRecord) -> dict[str, Any]:
    scores = r.scores
    return {
        "float": scores.float,
        "qat": scores.qat,
        "reference": scores.reference,
        "program": scores.program,
        "ptq": scores.ptq,
        "qat_reference": scores.qat_reference,
        "shipped": scores.shipped,
        "candidates": scores.candidates,
        "selected_on": scores.selected_on,
        "lowest": scores.lowest,
        "drop": scores.float - scores.program,
        "max_drop": r.config.max_drop,
        #: 95% intervals over the evaluation samples, paired tests on the same samples (edgeq.checks.stats)
        "intervals": scores.intervals,
        "paired": scores.paired,
        "verdict": scores.verdict,
    }


def _delegation(delegation: Any) -> dict[str, Any]:
    return {
        "delegated_ops": delegation.delegated_ops,
        "outside_ops": delegation.outside_ops,
        "delegate_calls": delegation.delegate_calls,
        "flops_in_delegate": delegation.flops_in_delegate,
        "outside": delegation.outside,
        "by_op": {op: {"delegated": d, "outside": o} for op, (d, o) in delegation.by_op.items()},
    }


_QAT_FIELDS = (
    "steps", "seconds", "step_seconds", "first_loss", "last_loss", "commits", "intermediate", "losses",
    "planned_steps", "passes", "holdout_losses", "best_step", "stopped_early", "initial_ranges", "rate_search",
)  # fmt: skip


def _qat(r: BuildRecord) -> dict[str, Any]:
    return {"config": r.config.training.to_dict(), **{name: getattr(r.qat_report, name) for name in _QAT_FIELDS}}


def _planner(r: BuildRecord) -> dict[str, Any] | None:
    planned = r.planned
    if planned is None:
        return None
    return {
        "predicted_drop": planned.predicted_drop,
        # The prediction sums single-layer drops measured on calibration data; the program's
        # measured drop beside it confirms or refutes it.
        "measured_drop": r.scores.float - r.scores.program,
        "estimated_program_bytes": planned.program_bytes,
        "considered": [asdict(p) for p in planned.considered],
    }


def render_html(report: dict[str, Any]) -> str:
    chosen = {layer["name"]: layer for layer in report["plan"]}
    plan_rows = [[p["name"], p["kind"], p["params"], p["precision"], p["reason"]] for p in report["plan"]]
    analysis = report.get("analysis")
    analysis_rows, figures = [], []
    if analysis:
        from edgeq.ship import plots

        for layer in analysis["layers"]:
            planned = chosen.get(layer["name"], {})
            analysis_rows.append(
                [
                    layer["name"],
                    layer["kind"],
                    f"[{layer['weight_min']:.3f}, {layer['weight_max']:.3f}]",
                    layer["channel_spread"],
                    f"[{layer['act_min']:.3f}, {layer['act_max']:.3f}]",
                    layer["act_p999"],
                    layer["act_p9999"],
                    layer["outlier_ratio"],
                    ", ".join(f"{k} {v:.1f}" for k, v in layer["weight_sqnr"].items()),
                    ", ".join(f"{k} {v:.1f}" for k, v in layer["act_sqnr"].items()),
                    ", ".join(f"{k} {v:+.4f}" for k, v in layer["loss_delta"].items()),
                    planned.get("precision", ""),
                    planned.get("reason", ""),
                ]
            )
        figures = [plots.ranges_figure(analysis["layers"]), plots.sensitivity_figure(analysis["layers"])]
        if report.get("planner"):
            measured = (report["size"]["program_bytes"], report["accuracy"]["program"])
            figures.append(plots.tradeoff_figure(report["planner"]["considered"], analysis["float_metric"], measured))
    program = report.get("program_layers") or {}
    program_rows = [
        [
            p["name"],
            ", ".join(p["ops"]),
            p["kernel_vs_reference_db"],
            f"{100 * p['mismatch']:.2f}%",
            p["max_steps"],
            p["program_vs_reference_db"],
            _db(p["program_vs_float_db"]),
            _db(p["reference_vs_float_db"]),
        ]
        for p in program.get("layers", [])
    ]
    notes = []
    for key, value in (report.get("program") or {}).items():
        if key == "delegate_payloads":
            value = ", ".join(f"{p['backend']}: {p['bytes']:,} B" for p in value)
        notes.append([key.replace("_", " "), value])
    candidates = (report.get("accuracy") or {}).get("candidates") or {}
    return render(
        "report.html.j2",
        candidate_names={name: f"{candidate_label(name)} (converted reference)" for name in candidates},
        note_rows=notes,
        report=report,
        plan_rows=plan_rows,
        analysis_rows=analysis_rows,
        figures=figures,
        program_rows=program_rows,
    )


def _db(value: Any) -> Any:
    return "—" if value is None else value


def write_html(path: Path, report: dict[str, Any]) -> None:
    write_bytes_atomic(Path(path), render_html(report).encode())
