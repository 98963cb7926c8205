"""Qualcomm HTP (SM8650) on the host HTP simulator: uniform 8a8w vs uniform 16a4w vs the planner's plan.

Each variant is a full ``edgeq.build`` for ``qualcomm-sm8650``; every accuracy is
the lowered ``.pte``'s, run by ExecuTorch's QNN backend on Qualcomm's HTP
simulator (host HTP runtime or a QAIRT SDK); sizes are the real program and its
HTP context binary. 16a4w is built with and without the intermediate 8-bit
width, and adaptive ranges are compared with PT2E's moving average (ema) for
the same plans.

    python scripts/bench_qnn.py [--tasks digits mnist fsdd] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_report import machine, table, write_section  # noqa: E402
from bench_tasks import tasks  # noqa: E402

from edgeq.backends import qnn_host  # noqa: E402
from edgeq.configs import BuildConfig, QATConfig, RangeConfig  # noqa: E402
from edgeq.errors import AccuracyError  # noqa: E402
from edgeq.pipeline import build  # noqa: E402

TARGET = "qualcomm-sm8650"
VARIANTS = {
    "uniform 8a8w": dict(precision="8a8w"),
    "uniform 16a4w, intermediate 8-bit first": dict(precision="16a4w"),
    "uniform 16a4w, no intermediate width": dict(precision="16a4w", intermediate_share=0.0),
    "uniform 16a4w, ema ranges": dict(precision="16a4w", ranges="ema"),
    "planner (--max-drop 1)": dict(),
    "planner (--max-drop 1), ema ranges": dict(ranges="ema"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "mnist", "fsdd"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    libraries = qnn_host.describe()
    rows, start = [], time.time()
    for name, recipe in tasks(args.tasks).items():
        if recipe is None:
            continue
        for label, options in VARIANTS.items():
            options = dict(options)
            qat = QATConfig(
                steps=args.steps,
                intermediate_share=options.pop("intermediate_share", 0.3),
                ranges=RangeConfig(mode=options.pop("ranges", "adaptive")),
            )
            # The planner plans under --max-drop; uniform plans take a gate that never trips.
            max_drop = 1.0 if "precision" not in options else 100.0
            began = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out"
                try:
                    build(
                        recipe,
                        BuildConfig(target=TARGET, out=out, qat=qat, max_drop=max_drop, debug_program=False, **options),
                    )
                except AccuracyError:
                    pass  # the artifacts are written all the same; the report says by how much
                report = json.loads((out / "report.json").read_text())
                manifest = json.loads((out / "manifest.json").read_text())
            seconds = time.perf_counter() - began
            acc = report["accuracy"]
            if not rows or rows[-1][0] != name:
                rows.append([name, "float (PyTorch)", f"{acc['float']:.2f}", "-", "-", "-", "-", "-", "-"])
            precisions = sorted({entry["precision"] for entry in report["plan"]})
            rows.append(
                [
                    name,
                    label,
                    f"{acc['program']:.2f}",
                    f"{acc['reference']:.2f}",
                    f"{report['agreement']['reference_vs_program']:.1f}%",
                    f"{report['size']['program_bytes']:,}",
                    f"{manifest['program']['delegate_payload_bytes']:,}",
                    ", ".join(precisions),
                    f"{seconds:.0f} (lower {report['timings']['lower']:.1f})",
                ]
            )
            print(f"[{time.time() - start:5.0f}s]", rows[-1], flush=True)
    body = "\n".join(
        [
            "## Qualcomm HTP on the host simulator (scripts/bench_qnn.py)",
            "",
            f"{machine()}. Target {TARGET}; {args.steps} QAT steps; QNN libraries: {libraries}.",
            "Accuracy is model.pte's, run by ExecuTorch's QNN backend on the HTP simulator; 'reference' is the converted "
            "PT2E model the program is lowered from; 'context binary' is the HTP payload inside model.pte.",
            "",
            table(
                [
                    "task",
                    "variant",
                    ".pte top-1",
                    "reference",
                    "ref/.pte agreement",
                    "model.pte bytes",
                    "context binary bytes",
                    "precisions",
                    "build s",
                ],
                rows,
            ),
            "",
        ]
    )
    print(body)
    if not args.no_write:
        write_section("Qualcomm HTP on the host simulator", body)


if __name__ == "__main__":
    main()
