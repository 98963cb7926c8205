"""Data-parallel QAT under torch.distributed (gloo, 2 processes on the CPU)."""

from __future__ import annotations

import pytest
import torch
from gloo import run_ranks

pytestmark = pytest.mark.slow

STEPS = 16
#: The runs are in float64. In float32, DDP's average of two half-batch gradients differs from one
#: process's full-batch gradient by ~3e-4 after 16 steps, and a vote whose share sits on its
#: threshold then tips one way in one run and the other way in the other: a CI machine saw a
#: committed range 1.7% apart. In float64 the reorder is ~1e-13, far below any vote's margin, so
#: the comparison can be tight and still hold on any CPU.
TOLERANCE = 1e-6


def _recipe(pairs: bool):
    """Digits in batches of 32; with ``pairs``, each batch is two consecutive ones (the global batch)."""
    import dataclasses

    from edgeq.recipe import load_recipe

    base = load_recipe(None)
    from edgeq.examples.digits import _data

    x, y, _, _ = _data()
    x = x.double()
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 1280, 32)]
    if pairs:
        batches = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(batches[::2], batches[1::2])]
    return dataclasses.replace(
        base,
        train_data=lambda: list(batches),
        model=lambda: base.model().double(),
        example_inputs=lambda: tuple(t.double() for t in base.example_inputs()),
    )


def _train(pairs: bool):
    from edgeq.backends import load_target, quant_spec
    from edgeq.capture import capture, fold_batchnorm
    from edgeq.planning.plan import uniform_plan
    from edgeq.quant.convert import prepare
    from edgeq.quant.fake_quant import AdaptiveRangeFakeQuantize
    from edgeq.quant.qat import QATConfig, run_qat

    recipe = _recipe(pairs)
    model = recipe.model()
    target = load_target("android")
    graph = capture(model, recipe.example_inputs())
    fold_batchnorm(graph)
    prepared = prepare(graph, quant_spec(uniform_plan(model, target), target))
    run_qat(
        prepared,
        recipe,
        QATConfig(steps=STEPS, calibration_batches=4, checkpoint_every=0, lr=5e-3, loss="task", holdout=0.0),
    )
    # NumPy copies: they cross process boundaries by value, unlike tensors' shared memory.
    ranges = {
        n: m.committed.numpy().copy() for n, m in prepared.named_modules() if isinstance(m, AdaptiveRangeFakeQuantize)
    }
    weights = {n: p.detach().numpy().copy() for n, p in prepared.named_parameters()}
    return ranges, weights


def _rank_train(rank: int):
    return _train(pairs=False)


def test_ddp_ranks_agree_and_match_one_process_over_the_same_global_batches():
    results = run_ranks(_rank_train, world=2)
    (r0_ranges, r0_weights), (r1_ranges, r1_weights) = results[0], results[1]
    # Every rank holds identical committed ranges (observations were reduced before voting).
    assert r0_ranges.keys() == r1_ranges.keys() and r0_ranges
    import numpy as np

    for name in r0_ranges:
        assert np.array_equal(r0_ranges[name], r1_ranges[name]), name
    for name in r0_weights:
        assert np.array_equal(r0_weights[name], r1_weights[name]), name
    # One process over the same global batches (pairs of rank batches) lands in the same place.
    ranges, weights = _train(pairs=True)
    for name in ranges:
        assert np.allclose(ranges[name], r0_ranges[name], rtol=TOLERANCE, atol=TOLERANCE), name
    for name in weights:
        assert np.allclose(weights[name], r0_weights[name], rtol=TOLERANCE, atol=TOLERANCE), name
