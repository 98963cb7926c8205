"""Helpers shared by the benchmark scripts: machine description and BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    threads = torch.get_num_threads()
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs ({threads} torch threads), {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}; "
        f"{datetime.date.today().isoformat()}"
    )


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = (
        BENCHMARKS.read_text()
        if BENCHMARKS.exists()
        else "# edgeq benchmarks\n\nWritten by the scripts in `scripts/`; each section says how to reproduce it.\n"
    )
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)


def top1_pair(pair: dict) -> dict:
    """A saved top-1 paired test with its interval as edgeq computes it now (Tango's score interval from
    the discordant counts the JSON keeps; runs before it saved a paired bootstrap, which is [0, 0] when
    no sample flips)."""
    if not pair.get("discordant"):
        return pair
    from edgeq.checks.stats import paired_proportion_interval

    low, high = paired_proportion_interval(*pair["discordant"], pair["samples"])
    return {**pair, "low": low, "high": high, "method": "McNemar exact test; Tango score interval"}


def table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def commit() -> str:
    """The edgeq commit a benchmark ran at (short hash)."""
    import subprocess

    found = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    return found.stdout.strip() or "unknown"


def plan_mix(layers: list[dict]) -> dict[str, int]:
    """How many layers of plan.json's ``layers`` hold each "kind precision" (e.g. "conv int8")."""
    mix: dict[str, int] = {}
    for layer in layers:
        key = f"{layer['kind']} {layer['precision']}"
        mix[key] = mix.get(key, 0) + 1
    return mix


def task_build_settings(kind: str, target: str) -> dict:
    """``edgeq build`` settings of a task benchmark's row: "int8" builds every layer at the target's own
    8-bit precision (int8 on CPUs, 8a8w on the HTP) with the gate off; "default" is what a user's
    `edgeq build` does: --max-drop 1 steers the planner (a gate it misses is measured all the same),
    where --max-drop 100 would let it narrow every layer that saves bytes."""
    from edgeq.backends import load_target

    if kind == "int8":
        return {"target": target, "precision": load_target(target).default_precision, "max_drop": 100.0}
    return {"target": target}


def distilled_data(teacher, train_x, eval_x, eval_targets, batch: int) -> tuple:
    """A recipe's train_data() with the float model's outputs as targets (distillation needs no
    labels) and eval_data() with the real targets, both in batches of ``batch``."""
    import torch

    with torch.no_grad():
        taught = torch.cat([teacher(train_x[i : i + batch]) for i in range(0, len(train_x), batch)])

    def train_data():
        for i in range(0, len(train_x), batch):
            yield train_x[i : i + batch], taught[i : i + batch]

    def eval_data():
        for i in range(0, len(eval_x), batch):
            yield eval_x[i : i + batch], eval_targets[i : i + batch]

    return train_data, eval_data


def program_outputs(program: Path, recipe) -> tuple:
    """The program's outputs on the recipe's evaluation data, run by its backend's runner, and the targets."""
    import json

    from edgeq.backends import get_backend
    from edgeq.checks.evaluate import collect

    manifest = json.loads((program.parent / "manifest.json").read_text())
    return collect(get_backend(manifest["target"]["backend"]).runner(program), recipe.eval_data())


def build_facts(report: dict, program: Path) -> dict:
    """What every task benchmark's row reads off a build: bytes, layers per precision, float ops, the
    shipped candidate and each candidate's metric, delegation, stage times."""
    precisions: dict[str, int] = {}
    for layer in report["plan"]:
        precisions[layer["precision"]] = precisions.get(layer["precision"], 0) + 1
    return {
        "bytes": program.stat().st_size,
        "plan": precisions,
        "float_ops": report.get("float_ops", []),
        "shipped": report["accuracy"]["shipped"],
        "candidates": {k: v.get("metric") for k, v in report["accuracy"]["candidates"].items()},
        "delegation": {k: report["delegation"][k] for k in ("delegated_ops", "outside_ops", "delegate_calls")},
        "outside": report["delegation"].get("outside", {}),
        "warnings": report.get("warnings", []),
        "timings": report["timings"],
        "wall_seconds": report["wall_seconds"],
    }


def timed_build(recipe, out: Path, **settings) -> dict:
    """``edgeq.build``'s report.json with its wall time; a build the accuracy gate refused is measured
    all the same (its artifacts stay for inspection)."""
    import json
    import time

    from edgeq.configs import BuildConfig
    from edgeq.errors import AccuracyError
    from edgeq.pipeline import build

    start = time.perf_counter()
    try:
        build(recipe, BuildConfig(out=out, **settings))
    except AccuracyError:
        pass
    report = json.loads((out / "report.json").read_text())
    report["wall_seconds"] = time.perf_counter() - start
    return report


def perplexity_cells(acc: dict, ppl_digits: int = 2, ratio_digits: int = 3) -> list[str]:
    """An LLM row's float perplexity, the program's (ratio with its 95% interval) and next-token agreement
    (with its interval), from edgeq.llm.evaluate.compare's dict."""
    low, high = acc["perplexity_ratio_interval"]
    agree_low, agree_high = acc["agreement_interval"]
    r = ratio_digits
    return [
        f"{acc['float_perplexity']:.{ppl_digits}f}",
        f"{acc['program_perplexity']:.{ppl_digits}f} ({acc['perplexity_ratio']:.{r}f}x [{low:.{r}f}, {high:.{r}f}])",
        f"{acc['agreement']:.1f} [{agree_low:.1f}, {agree_high:.1f}]",
    ]
