"""HTP context-binary size per precision on a model large enough for weights to dominate (~300k weights).

The small benchmark tasks' HTP programs are mostly fixed overhead, so 4-bit
weights barely move their size; this measures what 16a4w does to weights,
PTQ and QAT (edgeq's quantizer and adaptive fake-quants), lowered for SM8650.

    python scripts/bench_qnn_sizes.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_report import machine, table, write_section  # noqa: E402

from edgeq.backends import (  # noqa: E402
    load_target,  # noqa: E402
    qnn_host,
    quant_spec,
)
from edgeq.capture import capture  # noqa: E402
from edgeq.lower import lower  # noqa: E402
from edgeq.planning.plan import uniform_plan  # noqa: E402
from edgeq.quant.configs import RangeConfig  # noqa: E402
from edgeq.quant.convert import convert, prepare  # noqa: E402
from edgeq.quant.qat import to_eval  # noqa: E402


def main() -> None:
    qnn_host.activate()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 64),
    ).eval()
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    x = torch.randn(1, 16, 8, 8)
    target = load_target("qualcomm-sm8650")
    rows = []
    for precision in ("8a8w", "16a8w", "16a4w"):
        for qat in (False, True):
            prepared = prepare(
                capture(model, (x,), dynamic_batch=False),
                quant_spec(uniform_plan(model, target, precision), target, qat=qat, ranges=RangeConfig()),
            )
            with torch.no_grad():
                for _ in range(4):
                    prepared(torch.randn(1, 16, 8, 8))
            if qat:
                to_eval(prepared)
            lowered = lower(convert(prepared), (x,), target)
            rows.append(
                [
                    precision,
                    "QAT fake-quants" if qat else "PTQ observers",
                    f"{len(lowered.program):,}",
                    f"{lowered.payloads()['delegate_payload_bytes']:,}",
                ]
            )
            print(rows[-1], flush=True)
    base = int(rows[0][2].replace(",", ""))
    for row in rows:
        row.append(f"{int(row[2].replace(',', '')) / base:.3f}")
    body = "\n".join(
        [
            "## HTP program size per precision (scripts/bench_qnn_sizes.py)",
            "",
            f"{machine()}. A conv+conv+linear model with {weights:,} weights, lowered for qualcomm-sm8650 with "
            f"{qnn_host.describe()}.",
            "",
            table(["precision", "quantized with", "model.pte bytes", "context binary bytes", "/ 8a8w"], rows),
            "",
        ]
    )
    print(body)
    write_section("HTP program size per precision", body)


if __name__ == "__main__":
    main()
