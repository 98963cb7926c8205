"""QAT loss: the recipe's task loss vs distillation from the float model vs both, side by side.

Every variant is a full ``edgeq.build`` for android at one precision, PTQ comparison off
so the number is QAT's own; accuracy is the lowered ``.pte``'s in ExecuTorch's runtime.

    python scripts/bench_loss.py [--tasks digits mnist fsdd] [--precision w4a8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_report import machine, table, write_section  # noqa: E402
from bench_tasks import tasks  # noqa: E402

from edgeq.configs import BuildConfig, QATConfig  # noqa: E402
from edgeq.pipeline import build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "mnist", "fsdd"])
    parser.add_argument("--precision", default="w4a8")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows, start = [], time.time()
    for name, recipe in tasks(args.tasks).items():
        if recipe is None:
            continue
        for loss in ("task", "distill", "both"):
            with tempfile.TemporaryDirectory() as tmp:
                result = build(
                    recipe,
                    BuildConfig(
                        out=Path(tmp) / "out",
                        precision=args.precision,
                        max_drop=100.0,
                        qat=QATConfig(steps=args.steps, loss=loss),
                        debug_program=False,
                        ptq_batches=0,
                    ),
                )
            s = result.scores
            rows.append(
                [
                    name,
                    loss,
                    f"{s.float:.2f}",
                    f"{s.qat:.2f}",
                    f"{s.program:.2f}",
                    f"{result.qat.first_loss:.4f} -> {result.qat.last_loss:.4f}",
                ]
            )
            print(f"[{time.time() - start:5.0f}s]", rows[-1], flush=True)
    body = "\n".join(
        [
            "## QAT loss: task vs distillation (scripts/bench_loss.py)",
            "",
            f"{machine()}. android, {args.precision} everywhere, {args.steps} QAT steps, adaptive ranges, one seed; "
            "PTQ comparison off, so every .pte is QAT's own.",
            "",
            table(["task", "QAT loss", "float", "QAT (simulated)", ".pte", "loss first -> last"], rows),
            "",
        ]
    )
    print(body)
    if not args.no_write:
        write_section("QAT loss: task vs distillation", body)


if __name__ == "__main__":
    main()
