"""Bytes per weight of each android precision in a real program: the numbers in targets/android.toml.

For each precision, two small models (two linears, or two 3x3 convs) that differ only in
their hidden width are quantized (PTQ) and lowered with the XNNPACK delegate; the difference
in program bytes over the difference in weight count is what one more weight costs, with its
share of per-channel scales and biases. Embedding tables: an nn.Embedding of 1,000 and
2,000 rows of 256.

    python scripts/bench_android_sizes.py [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_report import machine, table, write_section  # noqa: E402


class Linears(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(256, width), nn.Linear(width, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))

    def channels(self) -> int:
        return self.a.out_channels if isinstance(self.a, nn.Conv2d) else self.a.out_features


class Convs(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(64, width, 3, padding=1), nn.Conv2d(width, 64, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))

    def channels(self) -> int:
        return self.a.out_channels if isinstance(self.a, nn.Conv2d) else self.a.out_features


class Table(nn.Module):
    def __init__(self, rows: int) -> None:
        super().__init__()
        self.table, self.head = nn.Embedding(rows, 256), nn.Linear(256, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(ids).mean(1))

    def channels(self) -> int:
        return self.table.num_embeddings


def program_bytes(model: nn.Module, data: torch.Tensor, precision: str) -> int:
    from edgeq.backends import load_target, quant_spec
    from edgeq.capture import capture
    from edgeq.lower import lower, lower_float
    from edgeq.planning.plan import uniform_plan
    from edgeq.quant.convert import convert, prepare

    target = load_target("android")
    example = (data[:1],)
    if precision == "fp32":
        return len(lower_float(model, example, target))
    plan = uniform_plan(model, target, precision, example_inputs=example)
    prepared = prepare(capture(model, example), quant_spec(plan, target, qat=False))
    with torch.no_grad():
        prepared(data)
    return len(lower(convert(prepared), example, target).program)


def weights(model: nn.Module, kind: type) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, kind))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from edgeq.backends import load_target

    torch.manual_seed(0)
    menu = load_target("android").precisions
    cases = [
        ("linear", Linears, (256, 512), torch.randn(8, 256), nn.Linear),
        ("conv", Convs, (256, 512), torch.randn(4, 64, 8, 8), nn.Conv2d),
        ("embedding", Table, (1000, 2000), torch.randint(0, 1000, (4, 16)), nn.Embedding),
    ]
    rows = []
    for kind, cls, (small, large), data, layer in cases:
        for precision in [
            "fp32",
            *[p for p, spec in menu.items() if kind in spec.ops and (spec.half or not spec.is_float)],
        ]:
            models = [cls(small).eval(), cls(large).eval()]
            sizes = [program_bytes(m, data, precision) for m in models]
            per_weight = (sizes[1] - sizes[0]) / (weights(models[1], layer) - weights(models[0], layer))
            # What the menu predicts for the same difference: weight_bytes per weight, plus per
            # output channel the float32 bias (not for a table) and channel_bytes on top of it.
            extra_channels = models[1].channels() - models[0].channels()
            extra_weights = weights(models[1], layer) - weights(models[0], layer)
            bias = 0.0 if kind == "embedding" else 4.0
            if precision == "fp32":
                declared = 4.0 + bias * extra_channels / extra_weights
            else:
                spec = menu[precision]
                declared = spec.weight_bytes + (bias + spec.channel_cost(kind)) * extra_channels / extra_weights
            rows.append([kind, precision, f"{sizes[0]:,}", f"{sizes[1]:,}", f"{per_weight:.4f}", f"{declared:.4f}"])
            print(rows[-1], flush=True)
    body = (
        "## Android program bytes per weight (scripts/bench_android_sizes.py)\n\n"
        f"{machine()}. Two models per kind differing only in width, PTQ, lowered with the XNNPACK "
        "delegate (embeddings: ExecuTorch's quantized embedding ops); bytes per weight = program "
        "difference / weight difference, so each weight's share of per-channel scales and biases "
        "is included. `predicted` is the same ratio from targets/android.toml (`weight_bytes` per "
        "weight, and per output channel the float32 bias plus `channel_bytes`).\n\n"
        + table(["kind", "precision", "small program", "large program", "bytes / weight", "predicted"], rows)
    )
    if not args.no_write:
        write_section("android sizes", body)
    print(body)


if __name__ == "__main__":
    main()
