"""Fidelity: the fake-quant model edgeq evaluates computes what convert_pt2e ships."""

from __future__ import annotations

import copy

import pytest
import torch
from recipes import recipe_of
from torch import nn

from edgeq.backends import load_target, quant_spec
from edgeq.capture import capture, fold_batchnorm
from edgeq.checks.evaluate import sqnr_db
from edgeq.planning.plan import uniform_plan
from edgeq.quant.configs import RangeConfig
from edgeq.quant.convert import convert, prepare
from edgeq.quant.qat import QATConfig, run_qat, to_eval
from edgeq.recipe import Recipe

pytestmark = pytest.mark.slow

#: simulated vs converted outputs must agree at least this well
MIN_SQNR_DB = 30.0


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def _recipe() -> Recipe:
    torch.manual_seed(0)
    model = ConvBN()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 3, 12, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen)) for _ in range(6)]
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for x, _ in data:
            model(x)
    model.eval()
    return recipe_of(model, data, "convbn", eval_batches=data[:2], fresh=lambda: copy.deepcopy(model))


@pytest.mark.parametrize(
    "fold_bn,mode",
    [(True, "adaptive"), (False, "adaptive"), (True, "ema")],
    ids=["bn-folded-adaptive", "bn-simulated-adaptive", "bn-folded-ema"],
)
def test_fake_quant_and_converted_agree_at_4_bit_weights(fold_bn, mode):
    recipe = _recipe()
    model = recipe.model()
    target = load_target("android")
    graph = capture(model, recipe.example_inputs())
    if fold_bn:
        fold_batchnorm(graph)
    config = QATConfig(
        steps=12,
        calibration_batches=3,
        fold_bn=fold_bn,
        freeze_bn=0.5,
        checkpoint_every=0,
        ranges=RangeConfig(mode=mode),
        lr=1e-2,
        loss="task",
        patience=0,
    )
    prepared = prepare(graph, quant_spec(uniform_plan(model, target, "w4a8"), target, ranges=config.ranges))
    run_qat(prepared, recipe, config)
    reference = convert(copy.deepcopy(prepared))
    simulated = to_eval(prepared)
    x = torch.cat([b[0] for b in recipe.eval_data()])
    with torch.no_grad():
        assert sqnr_db(reference(x), simulated(x)) >= MIN_SQNR_DB
