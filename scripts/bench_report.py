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
