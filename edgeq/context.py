"""What every build stage is handed, and the typed results stages hand on.

A build is a short list of stages (see :mod:`edgeq.pipeline`); each is a
function taking a :class:`BuildContext` and the results of the stages before
it. The context holds what does not change during a build: the loaded recipe,
the resolved target (with its backend), the resolved settings, the stage
timer and the progress display.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from edgeq.checks.evaluate import Evaluation, evaluate
from edgeq.configs import BuildConfig, QATConfig
from edgeq.planning.plan import Plan
from edgeq.quant.qat import QATReport
from edgeq.quant.spec import QuantSpec, quant_spec
from edgeq.recipe import Recipe
from edgeq.targets import Target
from edgeq.timing import Stages

__all__ = [
    "BuildContext", "FloatBaseline", "Progress", "QuietProgress", "Quantized", "checkpoint_path",
]  # fmt: skip


class Progress(Protocol):
    """What a build reports while it runs (the CLI's rich display implements it)."""

    def stage(self, name: str) -> None: ...

    def qat_start(self, steps: int) -> None: ...

    def step(self, i: int, loss: float) -> None: ...

    def eval_start(self, label: str) -> None: ...

    def eval_advance(self, k: int) -> None: ...

    def eval_end(self) -> None: ...


class QuietProgress:
    """A build with nobody watching (``edgeq.build`` from Python without ``progress``)."""

    def stage(self, name: str) -> None:
        pass

    def qat_start(self, steps: int) -> None:
        pass

    def step(self, i: int, loss: float) -> None:
        pass

    def eval_start(self, label: str) -> None:
        pass

    def eval_advance(self, k: int) -> None:
        pass

    def eval_end(self) -> None:
        pass


@dataclass
class BuildContext:
    recipe: Recipe
    #: resolved: ``target.impl`` is its backend
    target: Target
    #: resolved: ``config.qat`` holds the QAT settings the build runs with
    config: BuildConfig
    stages: Stages = field(default_factory=Stages)
    progress: Progress = field(default_factory=QuietProgress)

    @property
    def training(self) -> QATConfig:
        return self.config.training

    @property
    def backend(self) -> Any:
        return self.target.impl

    def announce(self, name: str) -> None:
        self.progress.stage(name)

    def spec(self, plan: Plan, qat: bool) -> QuantSpec:
        """The plan's quantization spec: QAT's fake-quants with the build's range method, or PTQ observers."""
        return quant_spec(plan, self.target, qat=qat, ranges=self.training.ranges if qat else None)

    def score(self, model: Callable, label: str) -> Evaluation:
        """``model`` on the recipe's evaluation data: reported, never used to decide what ships."""
        self.progress.eval_start(label)
        try:
            recipe = self.recipe
            return evaluate(
                model,
                recipe.eval_data(),
                recipe.metric,
                progress=self.progress.eval_advance,
                select=recipe.score_output,
            )
        finally:
            self.progress.eval_end()


@dataclass
class FloatBaseline:
    """The float model as captured, and the float program sizes are measured against."""

    model: torch.nn.Module
    example_inputs: tuple
    graph: torch.fx.GraphModule
    program_bytes: int
    #: the lowered float program itself (host latency is measured against it)
    program: bytes = b""
    #: which of the program's outputs is the recipe's scored one (Recipe.scored_index)
    scored_output: int = 0


@dataclass
class Quantized:
    fake_quant: torch.fx.GraphModule
    reference: torch.fx.GraphModule
    qat: QATReport


def checkpoint_path(out_dir: Path) -> Path:
    """Beside the output directory, so that a failed build leaves that directory untouched."""
    out_dir = Path(out_dir).absolute()
    return out_dir.with_name(f".{out_dir.name}.edgeq-checkpoint") / "qat.pt"
