"""The bundled examples' float weights do not depend on the process that trains them first."""

from __future__ import annotations

import torch
from torch import nn

from edgeq.examples._cache import TRAIN_THREADS, _with_threads, cached_model


def _train() -> nn.Module:
    """A stand-in for an example's training whose result follows the thread count, as digits' did
    (up to 0.07 apart between 1 and 2 threads): a float32 sum, reduced in per-thread chunks."""
    values = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0))
    net = nn.Linear(1, 1)
    with torch.no_grad():
        net.bias.fill_(values.sum())
    return net


def test_an_example_trains_the_same_weights_whatever_threads_the_caller_runs_with(tmp_path) -> None:
    # the stand-in does depend on the threads, so the cache's fixed count is what the test sees
    other = 2 if TRAIN_THREADS != 2 else 1
    assert _with_threads(other, _train).bias.item() != _with_threads(TRAIN_THREADS, _train).bias.item()
    trained = []
    for threads in (other, 3):

        def load(threads: int = threads) -> nn.Module:
            net = cached_model(tmp_path / f"example-{threads}.pt", nn.Linear(1, 1), _train)
            assert torch.get_num_threads() == threads  # the caller's setting comes back
            return net

        trained.append(_with_threads(threads, load).bias.item())
    assert trained == [_with_threads(TRAIN_THREADS, _train).bias.item()] * 2
