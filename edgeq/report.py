"""The build's report (JSON and a self-contained HTML page) and its manifest."""

from __future__ import annotations

import html
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .package import versions, write_bytes_atomic

MANIFEST_SCHEMA = 1


#: field -> type of the manifest, schema version MANIFEST_SCHEMA ("*" marks list items)
MANIFEST_FIELDS: dict[str, type | tuple] = {
    "schema": int, "model": str, "sha256": str,
    "recipe": dict, "recipe.name": str, "recipe.source": str, "recipe.sha256": str,
    "target": dict, "target.name": str, "target.backend": str, "target.chipset": str,
    "inputs": list, "inputs.*.name": str, "inputs.*.shape": list, "inputs.*.dtype": str,
    "outputs": list, "outputs.*.name": str, "outputs.*.shape": list, "outputs.*.dtype": str,
    "preprocessing": dict, "labels": (list, type(None)),
    "versions": dict, "versions.edgeq": str, "versions.executorch": str, "versions.torch": str,
    "build": dict, "build.seed": int, "build.qat": dict,
}


def check_manifest(manifest: dict[str, Any]) -> None:
    """Raise ValueError naming the first field that does not follow the schema."""

    def walk(value: Any, parts: list[str], path: str) -> None:
        if not parts:
            return
        head, rest = parts[0], parts[1:]
        if head == "*":
            for i, item in enumerate(value):
                walk(item, rest, f"{path}.{i}")
            return
        if not isinstance(value, dict) or head not in value:
            raise ValueError(f"manifest lacks {(path + '.' + head).lstrip('.')}")
        child = value[head]
        full = f"{path}.{head}".lstrip(".")
        if not rest:
            want = MANIFEST_FIELDS[".".join(p if not p.isdigit() else "*" for p in full.split("."))]
            if not isinstance(child, want) or (want is int and isinstance(child, bool)):
                raise ValueError(f"manifest field {full} is {type(child).__name__}, expected {want}")
        walk(child, rest, full)

    for field in MANIFEST_FIELDS:
        walk(manifest, field.split("."), "")
    if manifest["schema"] != MANIFEST_SCHEMA:
        raise ValueError(f"manifest schema {manifest['schema']}, expected {MANIFEST_SCHEMA}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def manifest(recipe, target, config, signature, example_inputs, float_model, program_sha256: str) -> dict[str, Any]:
    """``signature``: the loaded program's ProgramSignature (its output shapes and dtypes)."""
    names = _input_names(float_model, len(example_inputs))
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
        "preprocessing": recipe.preprocessing,
        "labels": recipe.labels,
        "versions": versions(),
        # Everything else that determines the program's bytes.
        "build": {
            "seed": config.seed,
            "precision": config.precision,
            "plan": str(config.plan) if config.plan is not None else None,
            "qat": config.qat.to_dict(),
            "python": platform.python_version(),
        },
    }


def _input_names(model: torch.nn.Module, count: int) -> list[str]:
    import inspect

    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params][:count]
    except (TypeError, ValueError):
        names = []
    return names + [f"input_{i}" for i in range(len(names), count)]


def build_report(recipe, target, config, plan, scores, sizes, lowered, qat_report, timings, samples: int,
                 analysis=None, planned=None, layer_errors=(), first_divergence=None,
                 program_layers: dict[str, Any] | None = None) -> dict[str, Any]:
    delegation = lowered.delegation
    return {
        "recipe": recipe.name,
        "target": target.name,
        "backend": target.backend,
        "samples": samples,
        "accuracy": {
            "float": scores.float,
            "qat": scores.qat,
            "reference": scores.reference,
            "program": scores.program,
            "drop": scores.float - scores.program,
            "max_drop": config.max_drop,
        },
        "agreement": scores.agreement,
        "size": {
            **sizes,
            "ratio": sizes["program_bytes"] / sizes["float_program_bytes"] if sizes["float_program_bytes"] else None,
        },
        "delegation": {
            "delegated_ops": delegation.delegated_ops,
            "outside_ops": delegation.outside_ops,
            "delegate_calls": delegation.delegate_calls,
            "flops_in_delegate": delegation.flops_in_delegate,
            "outside": delegation.outside,
            "by_op": {op: {"delegated": d, "outside": o} for op, (d, o) in delegation.by_op.items()},
        },
        "plan": [asdict(layer) for layer in plan.layers],
        "qat": {
            "config": config.qat.to_dict(),
            "steps": qat_report.steps,
            "seconds": qat_report.seconds,
            "step_seconds": qat_report.step_seconds,
            "first_loss": qat_report.first_loss,
            "last_loss": qat_report.last_loss,
            "commits": qat_report.commits,
            "intermediate": qat_report.intermediate,
            "losses": qat_report.losses,
        },
        "analysis": analysis.to_dict() if analysis is not None else None,
        "planner": {
            "predicted_drop": planned.predicted_drop,
            "estimated_program_bytes": planned.program_bytes,
            "considered": [asdict(p) for p in planned.considered],
        } if planned is not None else None,
        "layer_sqnr": {
            "reference_vs_float_db": {e.layer: e.sqnr_db for e in layer_errors},
            "first_divergence": first_divergence.layer if first_divergence is not None else None,
        },
        "program_layers": program_layers,
        "timings": timings,
        "versions": versions(),
    }


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_html(report: dict[str, Any]) -> str:
    acc, agree, size, dele = report["accuracy"], report["agreement"], report["size"], report["delegation"]
    sections = [
        f"<h1>edgeq build: {html.escape(report['recipe'])} for {html.escape(report['target'])}</h1>",
        "<h2>Accuracy</h2>",
        _table([
            ["float model", acc["float"]],
            ["QAT, as edgeq simulates it", acc["qat"]],
            ["converted reference (PT2E)", acc["reference"]],
            ["model.pte in ExecuTorch's runtime", acc["program"]],
            ["drop, float to model.pte (points)", acc["drop"]],
        ], ["model", f"metric on {report['samples']} samples"]),
        "<h3>Top-1 agreement (%)</h3>",
        _table([[k.replace("_", " "), v] for k, v in agree.items()], ["pair", "agreement"]),
        "<h2>Size</h2>",
        _table([
            ["float program (bytes)", size["float_program_bytes"]],
            ["quantized program (bytes)", size["program_bytes"]],
            ["ratio", size["ratio"]],
        ], ["", "value"]),
        "<h2>Delegation</h2>",
        f"<p>{dele['delegated_ops']} ops in {dele['delegate_calls']} delegate call(s); "
        f"{dele['outside_ops']} ops outside; {100 * dele['flops_in_delegate']:.1f}% of conv/linear compute inside the delegate.</p>",
        _table([[op, why] for op, why in dele["outside"].items()] or [["(none)", ""]], ["op outside the delegate", "why"]),
        "<h2>Precision plan</h2>",
        _table([[l["name"], l["kind"], l["params"], l["precision"], l["reason"]] for l in report["plan"]],
               ["layer", "kind", "weights", "precision", "reason"]),
        *_layer_sections(report),
        *_debug_section(report),
        "<h2>QAT</h2>",
        f"<p>{report['qat']['steps']} steps in {report['qat']['seconds']:.1f} s; loss {report['qat']['first_loss']:.4f} "
        f"to {report['qat']['last_loss']:.4f}.</p>",
        _table([[name, count] for name, count in report["qat"]["commits"].items()] or [["(adaptive ranges off)", ""]],
               ["tracked tensor", "range commits during training"]),
        "<h2>Time per stage (s)</h2>",
        _table([[k, v] for k, v in report["timings"].items()] + [["total", sum(report["timings"].values())]], ["stage", "seconds"]),
        "<h2>Versions</h2>",
        _table([[k, v] for k, v in report["versions"].items()], ["package", "version"]),
    ]
    style = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
             "th{background:#f3f3f3}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>edgeq report</title><style>{style}</style></head><body>{''.join(sections)}</body></html>\n"


def _layer_sections(report: dict[str, Any]) -> list[str]:
    analysis = report.get("analysis")
    if not analysis:
        return []
    from . import plots

    chosen = {l["name"]: l for l in report["plan"]}
    rows = []
    for l in analysis["layers"]:
        plan = chosen.get(l["name"], {})
        rows.append([
            l["name"], l["kind"], f"[{l['weight_min']:.3f}, {l['weight_max']:.3f}]", l["channel_spread"],
            f"[{l['act_min']:.3f}, {l['act_max']:.3f}]", l["act_p999"], l["act_p9999"], l["outlier_ratio"],
            ", ".join(f"{k} {v:.1f}" for k, v in l["weight_sqnr"].items()),
            ", ".join(f"{k} {v:.1f}" for k, v in l["act_sqnr"].items()),
            ", ".join(f"{k} {v:+.4f}" for k, v in l["loss_delta"].items()),
            plan.get("precision", ""), plan.get("reason", ""),
        ])
    figures = [plots.ranges_figure(analysis["layers"]), plots.sensitivity_figure(analysis["layers"])]
    if report.get("planner"):
        figures.append(plots.tradeoff_figure(report["planner"]["considered"], analysis["float_metric"]))
    return [
        "<h2>Per-layer analysis</h2>",
        f"<p>Measured on {analysis['batches']} calibration batches; sensitivity is the change in task loss with only "
        "that layer quantized.</p>",
        _table(rows, ["layer", "kind", "weight range", "channel spread", "input range", "p99.9 |x|", "p99.99 |x|",
                      "outlier ratio", "weight SQNR dB", "input SQNR dB", "sensitivity (Δloss)", "precision", "reason"]),
        "".join(f"<img alt='figure' src='{src}'>" for src in figures),
    ]


def _db(value: Any) -> Any:
    return "—" if value is None else value


def _debug_section(report: dict[str, Any]) -> list[str]:
    parts = []
    program = report.get("program_layers")
    if program and ("error" in program or "skipped" in program):
        parts += ["<h2>Numeric debugging: the program, layer by layer</h2>",
                  f"<p>Not in this report: {html.escape(program.get('error') or program['skipped'])}</p>"]
    elif program:
        same = program["shipped_max_diff"]
        parts += [
            "<h2>Numeric debugging: the program, layer by layer</h2>",
            f"<p>The quantized reference lowered with one XNNPACK delegate call per layer (same kernels, same integer "
            f"tensors; its outputs differ from model.pte's by at most {same:g}), run on {program['samples']} evaluation "
            "samples with ETDump; each layer's inputs and output read back with ExecuTorch's Inspector. <b>kernel</b>: "
            "the output against the reference's ops run on the layer's own program inputs (the kernels alone); "
            "<b>vs reference</b>: against the reference run end to end (differences accumulate); <b>vs float</b>: "
            f"against the float model at the same place. First layer below {program['threshold_db']:g} dB against "
            f"float: {html.escape(program['first_vs_float'] or 'none')}; first layer whose kernels leave the reference "
            f"(below {program['runtime_threshold_db']:g} dB): {html.escape(program['first_vs_reference'] or 'none')}. "
            "`edgeq debug` prints the same and keeps the ETRecord and ETDump.</p>",
            _table([[l["name"], ", ".join(l["ops"]), l["kernel_vs_reference_db"], f"{100 * l['mismatch']:.2f}%",
                     l["max_steps"], l["program_vs_reference_db"], _db(l["program_vs_float_db"]),
                     _db(l["reference_vs_float_db"])]
                    for l in program["layers"]],
                   ["layer", "ops", "kernel vs reference dB", "integers differing", "max steps",
                    "program vs reference dB", "program vs float dB", "reference vs float dB"]),
        ]
    layers = report.get("layer_sqnr", {}).get("reference_vs_float_db")
    if layers:
        first = report["layer_sqnr"]["first_divergence"]
        parts += [
            "<h2>Numeric debugging: the quantized reference</h2>",
            "<p>SQNR of each planned layer's output, quantized reference against float, on one evaluation batch, in "
            f"execution order; first layer below 20 dB: {html.escape(first or 'none')} "
            "(`edgeq debug --reference-only` prints the same).</p>",
            _table([[name, db] for name, db in layers.items()], ["layer", "SQNR dB"]),
        ]
    return parts


def write_html(path: Path, report: dict[str, Any]) -> None:
    write_bytes_atomic(Path(path), render_html(report).encode())
