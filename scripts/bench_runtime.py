"""What the quantized program wins at run time: latency and size, float vs int8, through ExecuTorch.

For the bundled digits model and a MobileNetV2-size network at 224x224
(random weights: latency does not depend on them), both lowered with the
XNNPACK delegate: the float program and the int8 program (PT2E, static,
per-channel weights), run through ``executorch.runtime`` with 1 and 2
threads; median of many runs, measured side by side in one process.

    python scripts/bench_runtime.py [--runs 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_report import machine, table, write_section  # noqa: E402

from edgeq.backends import (
    load_target,  # noqa: E402
    quant_spec,  # noqa: E402
)
from edgeq.capture import capture  # noqa: E402
from edgeq.lower import lower  # noqa: E402
from edgeq.planning.plan import uniform_plan  # noqa: E402
from edgeq.quant.convert import convert, prepare  # noqa: E402
from edgeq.recipe import load_recipe  # noqa: E402


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    """The MobileNetV2 architecture (Sandler et al. 2018), 1000 classes, width 1.0."""

    SETTINGS = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        cin = 32
        layers: list[nn.Module] = [nn.Conv2d(3, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6()]
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def programs(model: nn.Module, example: tuple, calibration: list[tuple]) -> tuple[bytes, bytes, object]:
    target = load_target("android")
    model = model.eval()
    float_program = lower(model, example, target).program
    prepared = prepare(capture(model, example), quant_spec(uniform_plan(model, target, "int8"), target, qat=False))
    with torch.no_grad():
        for batch in calibration:
            prepared(*batch)
    lowered = lower(convert(prepared), example, target)
    return float_program, lowered.program, lowered.delegation


def latency(program: bytes, example: tuple, threads: int, runs: int) -> float:
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    portable_lib._unsafe_reset_threadpool(threads)
    method = Runtime.get().load_program(program).load_method("forward")
    for _ in range(max(3, runs // 10)):
        method.execute(example)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        method.execute(example)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    digits = load_recipe(None)
    cases = {
        "digits CNN (1x1x8x8)": (
            digits.model(),
            digits.example_inputs(),
            [(x,) for x, _ in list(digits.train_data())[:8]],
            args.runs * 20,
        ),
        "MobileNetV2 (1x3x224x224)": (
            MobileNetV2(),
            (torch.randn(1, 3, 224, 224),),
            [(torch.randn(4, 3, 224, 224),) for _ in range(4)],
            args.runs,
        ),
    }
    rows, notes = [], []
    for name, (model, example, calibration, runs) in cases.items():
        fp, qp, delegation = programs(model, example, calibration)
        for threads in (1, 2):
            f = latency(fp, example, threads, runs)
            q = latency(qp, example, threads, runs)
            rows.append(
                [
                    name,
                    threads,
                    f"{1e3 * f:.3f}",
                    f"{1e3 * q:.3f}",
                    f"{q / f:.2f}",
                    f"{len(fp):,}",
                    f"{len(qp):,}",
                    f"{len(qp) / len(fp):.3f}",
                ]
            )
            print(rows[-1], flush=True)
        if delegation.outside:
            notes.append(f"{name}: outside the delegate: {delegation.outside}")
    body = "\n".join(
        [
            "## Runtime: float vs int8 program (scripts/bench_runtime.py)",
            "",
            f"Machine: {machine()}. XNNPACK delegate through `executorch.runtime`, batch 1, median of "
            f"{args.runs} runs ({args.runs * 20} for the digits model) after warm-up; thread count set with "
            "ExecuTorch's threadpool reset. Goal: int8 at or below 0.6x float latency and 0.27x float size.",
            "",
            table(
                [
                    "model",
                    "threads",
                    "float ms",
                    "int8 ms",
                    "latency int8/float",
                    "float bytes",
                    "int8 bytes",
                    "size int8/float",
                ],
                rows,
            ),
            "",
            *(notes or ["Every op of both int8 programs ran inside the XNNPACK delegate."]),
        ]
    )
    print(body)
    if not args.no_write:
        write_section("bench_runtime", body)


if __name__ == "__main__":
    main()
