"""Host latency of a lowered program, measured in ExecuTorch's runtime (not a phone's: a ratio travels better)."""

from __future__ import annotations

import statistics
import time

import torch

from edgeq.runtime import ProgramRunner


def host_latency_ms(program: bytes, example_inputs: tuple[torch.Tensor, ...], runs: int = 10) -> float:
    """Median milliseconds of one ``forward`` on the example inputs, after warm-up runs."""
    runner = ProgramRunner(program)
    try:
        for _ in range(2):
            runner.execute(*example_inputs)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            runner.execute(*example_inputs)
            times.append(time.perf_counter() - start)
        return 1000.0 * statistics.median(times)
    finally:
        runner.close()
