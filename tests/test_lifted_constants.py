"""An exported graph's lifted constants (a detector head's expand()ed anchor grid) survive QAT's
best-state restore, which load_state_dict refuses on them."""

from __future__ import annotations

import pytest
import torch
from recipes import batches_of, recipe_of
from torch import nn

from edgeq import capture, upstream
from edgeq.backends import load_target, quant_spec
from edgeq.configs import QATConfig
from edgeq.planning.plan import uniform_plan
from edgeq.quant.convert import prepare
from edgeq.quant.qat import _state_copy, restore_state, run_qat


class GridHead(nn.Module):
    """A YOLO-style head: a grid made once in forward with expand() and cached on the module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.grid = [torch.zeros(1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid[0].shape != (x.shape[0], 8):
            self.grid[0] = torch.arange(8.0).view(1, 8).expand(x.shape[0], 8)
        return self.fc(x) + self.grid[0]


def _prepared():
    upstream.apply()
    torch.manual_seed(0)
    model = GridHead().eval()
    x = torch.randn(64, 8)
    model(x[:16])
    recipe = recipe_of(model, batches_of(x, torch.zeros(64), 16))
    target = load_target("android")
    plan = uniform_plan(model, target, "int8", example_inputs=(x[:16],))
    graph = capture.capture_for_quantization(model, (x[:16],), True)
    return model, recipe, prepare(graph, quant_spec(plan, target, qat=True))


def test_load_state_dict_refuses_the_lifted_grid_and_restore_state_does_not():
    _, _, prepared = _prepared()
    lifted = [name for name in prepared.state_dict() if name.startswith("lifted_tensor")]
    assert lifted  # what the head's grid became
    saved = _state_copy(prepared)
    with pytest.raises(RuntimeError, match="single memory location"):  # the upstream behaviour worked around
        prepared.load_state_dict(saved)
    with torch.no_grad():
        prepared.get_parameter("fc.weight").add_(1.0)
    restore_state(prepared, saved)
    assert torch.equal(prepared.get_parameter("fc.weight"), saved["fc.weight"])


def test_qat_that_gets_worse_restores_its_best_state_on_such_a_graph():
    model, recipe, prepared = _prepared()
    # A learning rate that makes every step worse: QAT keeps (restores) its calibrated state.
    report = run_qat(prepared, recipe, QATConfig(steps=6, lr=50.0, patience=5, holdout=0.25), teacher=model)
    assert report.best_step is not None and report.best_step < report.steps
