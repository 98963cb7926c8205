"""The data every build decision is made on: the slice of train_data() held out of training.

Candidate selection, plan refinement and the accuracy fallback all measure
here (QAT's own loss, and the recipe's metric where a decision is about the
metric); the evaluation data is only ever reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from edgeq.checks.evaluate import collect
from edgeq.checks.stats import Paired, paired
from edgeq.configs import QATConfig
from edgeq.quant.qat import HeldOut, held_out_batches, is_held_out, schedule
from edgeq.recipe import Recipe, as_tuple

__all__ = ["Selection", "calibration_inputs", "selection_data"]


@dataclass
class Selection:
    #: QAT's loss on the held-out batches (distillation from the float model unless --loss task)
    held: HeldOut
    batches: list
    #: the hold-out stride: every ``every``-th training batch is held out (0: none)
    every: int
    #: what the decisions were measured on, for the report
    selected_on: str
    recipe: Recipe
    #: the float model every decision compares against
    float_model: torch.nn.Module
    _float_outputs: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def loss(self, model: Callable) -> float:
        return self.held.loss(model)

    def outputs(self, model: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """The scored outputs of ``model`` on the held-out batches, and the targets."""
        return collect(model, self.batches, select=self.recipe.score_output)

    def metric(self, model: Callable) -> float:
        """The recipe's metric on the held-out batches."""
        return float(self.recipe.metric(*self.outputs(model)))

    def float_outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float model's held-out outputs, computed once (refinement and the fallback compare against them)."""
        if self._float_outputs is None:
            self._float_outputs = self.outputs(self.float_model)
        return self._float_outputs

    def float_metric(self) -> float:
        return float(self.recipe.metric(*self.float_outputs()))

    def drop(self, model: Callable) -> Paired:
        """The float model's held-out metric minus ``model``'s, paired on the same samples, with its
        95% interval (McNemar for top-1, paired bootstrap otherwise)."""
        outputs, targets = self.float_outputs()
        return paired(self.recipe.metric, outputs, self.outputs(model)[0], targets)


def selection_data(recipe: Recipe, training: QATConfig, float_model: torch.nn.Module) -> Selection:
    """The held-out slice of train_data() and its loss; without one (one training batch, or
    ``holdout=0``), the first training batches, and the report says so."""
    every = schedule(recipe, training).holdout
    batches = held_out_batches(recipe, every)
    samples = sum(len(as_tuple(inputs)[0]) for inputs, _ in batches)
    selected_on = f"{samples} held-out training samples ({len(batches)} batches)"
    if not batches:
        batches = [b for _, b in zip(range(max(1, training.calibration_batches)), recipe.train_data())]
        selected_on = f"{len(batches)} training batches (no held-out slice)"
    teacher = float_model if training.loss != "task" else None
    held = HeldOut(training.loss, recipe, batches, teacher, "cpu")
    return Selection(held, batches, every, selected_on, recipe, float_model)


def calibration_inputs(recipe: Recipe, holdout: int, samples: int) -> tuple[torch.Tensor, ...]:
    """Up to ``samples`` training samples (held-out batches skipped), concatenated into one batch."""
    parts: list[tuple[Any, ...]] = []
    seen = 0
    for index, (inputs, _) in enumerate(recipe.train_data()):
        if is_held_out(index, holdout):
            continue
        inputs = as_tuple(inputs)
        parts.append(inputs)
        seen += int(inputs[0].shape[0])
        if seen >= samples:
            break
    return tuple(torch.cat(column)[:samples] for column in zip(*parts))
