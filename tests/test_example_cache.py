"""The bundled examples' float weights do not depend on the process that trains them first."""

from __future__ import annotations

import torch

from edgeq.examples import digits
from edgeq.examples._cache import TRAIN_THREADS, cached_model


def test_an_example_trains_the_same_weights_whatever_threads_the_caller_runs_with(tmp_path) -> None:
    previous = torch.get_num_threads()
    trained = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            net = cached_model(tmp_path / f"digits-{threads}.pt", digits.DigitsNet(), digits._train_float)
            trained.append(net.state_dict())
            assert torch.get_num_threads() == threads  # the caller's setting comes back
    finally:
        torch.set_num_threads(previous)
    assert TRAIN_THREADS > 1  # a count that differs from a test worker's one thread
    for name, weight in trained[0].items():
        assert torch.equal(weight, trained[1][name]), name
