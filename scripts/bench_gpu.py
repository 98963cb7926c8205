"""QAT throughput on a GPU: edgeq's adaptive-range QAT against float training, MobileNetV2-size.

For a lent GPU machine (see README). Trains the MobileNetV2 of
scripts/bench_runtime.py at 224x224 on random data (throughput does not
depend on the data), batch 128: float training, then edgeq QAT (PT2E
prepared graph, adaptive ranges, W8A8) on the same device, images per second
as the median over timed steps after warm-up, side by side in one run.

    python scripts/bench_gpu.py [--batch 128] [--steps 30]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_report import machine, table, write_section  # noqa: E402
from bench_runtime import MobileNetV2  # noqa: E402

from edgeq.backends import (
    load_target,  # noqa: E402
    quant_spec,
)
from edgeq.capture import capture, fold_batchnorm  # noqa: E402
from edgeq.planning.plan import uniform_plan  # noqa: E402
from edgeq.quant.configs import RangeConfig  # noqa: E402
from edgeq.quant.convert import prepare  # noqa: E402
from edgeq.quant.qat import set_observers  # noqa: E402


def throughput(model: torch.nn.Module, batch: int, steps: int, device: torch.device) -> float:
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    times = []
    for step in range(steps + 5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 5:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def gpu_quantizer(net, target, mode: str):
    """edgeq's XNNPACK quantizer; where ExecuTorch is not installed (the lent GPU
    machine carries torchao only), torchao's X86InductorQuantizer with edgeq's
    fake-quant swapped in: the same kind of fake-quants around the same convs
    and linears, which is what QAT throughput depends on."""
    try:
        return quant_spec(uniform_plan(net, target, "int8"), target, ranges=RangeConfig(mode=mode)), "XNNPACK"
    except ImportError:
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        from edgeq.quant.configs import swap_fake_quants

        config = get_default_x86_inductor_quantization_config(is_qat=True)
        from edgeq.quant.spec import QuantSpec

        quantizer = X86InductorQuantizer().set_global(swap_fake_quants(config, True, RangeConfig(mode=mode)))
        return QuantSpec(quantizer, qat=True, ranges=RangeConfig(mode=mode)), "X86Inductor (no ExecuTorch)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = MobileNetV2()
    float_ips = throughput(net.to(device).train(), args.batch, args.steps, device)
    net = net.cpu().eval()
    target = load_target("android")
    rows = [["float", f"{float_ips:.0f}", "1.00"]]
    for mode in ("adaptive", "ema-fused"):
        graph = capture(copy.deepcopy(net), (torch.zeros(1, 3, 224, 224),))  # export stays on the CPU; own weights
        fold_batchnorm(graph)
        quantizer, quantizer_name = gpu_quantizer(net, target, mode)
        prepared = prepare(graph, quantizer).to(device)
        from edgeq.quant.qat import fake_quants

        if not fake_quants(prepared):
            # Seen on a lent H200 with torch 2.11 and no ExecuTorch: the fallback quantizer annotated
            # nothing, and the "QAT" rows timed a float graph with BatchNorm folded (1.63x float).
            sys.exit(f"the {quantizer_name} quantizer inserted no fake-quants here: no QAT to time")
        with torch.no_grad():  # calibration, then tracking
            prepared(torch.randn(8, 3, 224, 224, device=device))
        from edgeq.quant.fake_quant import start_tracking

        start_tracking(prepared)
        set_observers(prepared, True)
        ips = throughput(prepared, args.batch, args.steps, device)
        rows.append([f"QAT, {mode} ({quantizer_name} quantizer)", f"{ips:.0f}", f"{ips / float_ips:.2f}"])
        print(rows[-1], flush=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    body = "\n".join(
        [
            "## QAT throughput on a GPU (scripts/bench_gpu.py)",
            "",
            f"Device: {gpu}; host {machine()}. MobileNetV2 224x224, batch {args.batch}, median over {args.steps} steps "
            "after 5 warm-up steps. Goal: adaptive-range QAT at least 0.64x float images/s.",
            "",
            table(["training", "images/s", "vs float"], rows),
        ]
    )
    print(body)
    if not args.no_write:
        write_section("bench_gpu", body)


if __name__ == "__main__":
    main()
