"""Small recipes for tests, in one place: a model with its batches, and the few shapes tests need."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgeq.recipe import Recipe


def recipe_of(
    model: nn.Module,
    batches: list,
    name: str = "test",
    eval_batches: list | None = None,
    fresh: Callable[[], nn.Module] | None = None,
    **fields: Any,
) -> Recipe:
    """A recipe over ``model`` (or ``fresh()`` per call) whose training data is ``batches`` and
    evaluation data ``eval_batches`` (default: the same batches); the example input is the first
    sample of the first batch."""
    first = batches[0][0]
    example = tuple(t[:1] for t in first) if isinstance(first, tuple) else (first[:1],)
    evaluation = batches if eval_batches is None else eval_batches
    return Recipe(
        name=name,
        model=fresh or (lambda: model),
        example_inputs=lambda: example,
        train_data=lambda: list(batches),
        eval_data=lambda: list(evaluation),
        **fields,
    )


def batches_of(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def fragile_mlp() -> Recipe:
    """An MLP on scikit-learn's digits whose middle activation has one channel 3000x the others.

    ReLU is positively homogeneous, so scaling a hidden unit up and its outgoing weights down
    leaves the float function as it was; an 8-bit per-tensor grid on that activation, though,
    has no room left for the other channels.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:1400]), y[:1400]).backward()
        opt.step()
    with torch.no_grad():
        unit = int(model[:4](x).mean(0).argmax())  # a live hidden unit
        model[2].weight[unit].mul_(3000.0)
        model[2].bias[unit].mul_(3000.0)
        model[4].weight[:, unit].div_(3000.0)
    model.eval()
    return recipe_of(model, batches_of(x[:1400], y[:1400], 100), "fragile", eval_batches=[(x[1400:], y[1400:])])
