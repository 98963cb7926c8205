"""Precision plans on android: float vs uniform int8 vs uniform 4-bit weights vs the planner's plan.

Each variant is a full `edgeq.build` (300 QAT steps, adaptive ranges), and
every accuracy is the lowered `.pte`'s in ExecuTorch's runtime; 4-bit weights
are built with and without the intermediate 8-bit width (spec claim 8).

    python scripts/bench_plans.py [--tasks digits mnist fsdd]
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

from edgeq.errors import AccuracyError  # noqa: E402
from edgeq.pipeline import BuildConfig, build  # noqa: E402
from edgeq.quant.qat import QATConfig  # noqa: E402

VARIANTS = {
    "uniform int8": dict(precision="int8"),
    "uniform w4a8, intermediate 8-bit first": dict(precision="w4a8"),
    "uniform w4a8, no intermediate width": dict(precision="w4a8", intermediate_share=0.0),
    "int8 conv + 4-bit dynamic linear (w4dyn)": dict(precision="w4dyn"),
    "planner (default, --max-drop 1)": dict(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "mnist", "fsdd"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows, start = [], time.time()
    for name, recipe in tasks(args.tasks).items():
        if recipe is None:
            continue
        for label, options in VARIANTS.items():
            options = dict(options)
            qat = QATConfig(steps=args.steps, intermediate_share=options.pop("intermediate_share", 0.3))
            # The planner plans under --max-drop 1; uniform plans take a gate that never trips. A missed
            # gate still writes the artifacts, so every variant is read back from its report.
            max_drop = 100.0 if "precision" in options else 1.0
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out"
                try:
                    build(recipe, BuildConfig(out=out, qat=qat, max_drop=max_drop, **options))
                except AccuracyError:
                    pass
                report = json.loads((out / "report.json").read_text())
            size, acc = report["size"], report["accuracy"]
            if not rows or rows[-1][0] != name:
                rows.append([name, "float", f"{acc['float']:.2f}", f"{size['float_program_bytes']:,}", "1.000", "-"])
            precisions = sorted({entry["precision"] for entry in report["plan"]})
            rows.append(
                [
                    name,
                    label,
                    f"{acc['program']:.2f}",
                    f"{size['program_bytes']:,}",
                    f"{size['program_bytes'] / size['float_program_bytes']:.3f}",
                    ", ".join(precisions),
                ]
            )
            print(f"[{time.time() - start:5.0f}s]", rows[-1], flush=True)
    body = "\n".join(
        [
            "## Precision plans (scripts/bench_plans.py)",
            "",
            f"Machine: {machine()}. Target android (XNNPACK), {args.steps} QAT steps with adaptive ranges, seed 0; "
            "accuracy of the `.pte` in ExecuTorch's runtime and its size. On XNNPACK, 4-bit conv weights are held "
            "in int8 (its qc4w packing is for linear layers), so `w4a8` buys no bytes; `w4dyn` packs a linear's "
            "weights two per byte with activations quantized at run time, and sits beside static int8 convolutions "
            "in one program (`--precision w4dyn`: convs stay at the int8 default). The planner picks from the whole "
            "menu per layer within `--max-drop`.",
            "",
            table(["task", "plan", ".pte accuracy", "program bytes", "size / float", "precisions used"], rows),
        ]
    )
    print(body)
    if not args.no_write:
        write_section("bench_plans", body)


if __name__ == "__main__":
    main()
