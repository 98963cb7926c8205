"""Quantization-aware training for decoders: the planned linears learn their grid from the float model.

GPTQ picks each quantized linear's integers to keep that one linear's output;
it cannot move the float weights, and on a checkpoint whose weights sit on
another grid (SmolLM2's Q4_1, asymmetric groups, against XNNPACK's symmetric
ones) that is where most of the 4-bit loss stays. QAT by distillation trains
the weights themselves through the program's own quantization: torchao's
``QATConfig`` derives the fake quantizers from the very
``Int8DynamicActivationIntxWeightConfig`` each linear is lowered with (weights
symmetric per group or per row, activations dynamic per token, asymmetric),
and the loss is the KL divergence from the float model's next-token
distribution on the recipe's training text. Checks on held-out training windows
(never ``eval_text()``) pick the weights that ship; the step-0 check is the
rounded model, so a run that does not help is visible.

The scales the fake quantizers train against are min-max (torchao's "affine"
choice), so the lowering uses that choice too for a QAT'd plan
(:attr:`LLMPlan.scales`), not the HQQ search round-to-nearest uses. Linears the
plan keeps at fp16 or float are not trained: their weights stay the float
model's (an fp16 linear rounds them to float16 when it is lowered).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from edgeq.errors import EdgeqError
from edgeq.llm.export import FLOATS, LLMPlan, linear_config
from edgeq.llm.plan import linear_modules

__all__ = ["HeldOutKL", "LLMQATConfig", "LLMQATResult", "distill"]


@dataclass(frozen=True)
class LLMQATConfig:
    #: optimizer steps, one training window each (0: no QAT)
    steps: int = 0
    lr: float = 1e-4
    #: tokens per training window
    window: int = 128
    #: held-out checks (after step 0) that decide which weights ship
    checks: int = 4
    #: held-out training windows the checks score
    held_out_windows: int = 8

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.window < 2 or self.checks < 1 or self.held_out_windows < 1:
            raise EdgeqError(
                f"QAT settings steps {self.steps}, lr {self.lr}, window {self.window}, checks {self.checks}, "
                f"held-out windows {self.held_out_windows} are out of range",
                "pass --steps >= 0 and --lr > 0 (window >= 2 tokens, at least one check and held-out window)",
            )


@dataclass
class LLMQATResult:
    steps: int
    lr: float
    tokens: int
    #: step -> mean KL (nats/token) from the float model on the held-out training windows
    held_out_kl: dict[int, float] = field(default_factory=dict)
    best_step: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "lr": self.lr,
            "tokens": self.tokens,
            "held_out_kl": {str(k): v for k, v in sorted(self.held_out_kl.items())},
            "best_step": self.best_step,
            "seconds": self.seconds,
        }


def _divergence(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(target || softmax(logits)) over positions; ``target`` holds log-probabilities."""
    predicted = torch.log_softmax(logits.float(), -1)
    return (target.exp() * (target - predicted)).sum(-1).mean()


def _kl(teacher: Any, student: Any, ids: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) of the next-token distributions over the window's positions."""
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=ids).logits[0].float(), -1)
    return _divergence(target, student(input_ids=ids).logits[0])


class HeldOutKL:
    """Mean KL from the float model on fixed windows, for any student: the teacher's
    log-probabilities are computed once (8 x 128 positions of a 49,152-token vocabulary: 200 MB)
    rather than at every check."""

    def __init__(self, teacher: Any, windows: list[list[int]]) -> None:
        self.ids = [torch.tensor([w]) for w in windows]
        with torch.no_grad():
            self.targets = [torch.log_softmax(teacher(input_ids=ids).logits[0].float(), -1) for ids in self.ids]

    def __call__(self, student: Any) -> float:
        training = student.training
        student.eval()
        with torch.no_grad():
            total = sum(
                float(_divergence(t, student(input_ids=ids).logits[0])) for t, ids in zip(self.targets, self.ids)
            )
        student.train(training)
        return total / len(self.ids)


def _fake_quantized(model: Any, plan: LLMPlan) -> tuple[Any, list[torch.nn.Parameter]]:
    """An untied copy of ``model`` whose planned linears fake-quantize as the program will run them,
    and the weights QAT trains (those linears')."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    student = copy.deepcopy(model)
    head = student.get_output_embeddings()
    if head is not None and head.weight is student.get_input_embeddings().weight:
        # the head trains to its own 4/8-bit grid; the token table keeps the float model's rows
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    names = linear_modules(student)
    for p in student.parameters():
        p.requires_grad_(False)
    for precision in sorted(set(plan.linears.values()) - set(FLOATS)):
        chosen = {hf for hf, target in names.items() if plan.linears.get(target) == precision}
        quantize_(
            student,
            QATConfig(linear_config(precision, "minmax"), step="prepare"),
            filter_fn=lambda m, fqn, chosen=chosen: isinstance(m, torch.nn.Linear) and fqn in chosen,
        )
    trained = [
        student.get_submodule(hf).weight for hf, t in names.items() if plan.linears.get(t, "float") not in FLOATS
    ]
    for weight in trained:
        weight.requires_grad_(True)
    return student, trained


def distill(
    model: Any, plan: LLMPlan, windows: list[list[int]], held_out: list[list[int]], config: LLMQATConfig
) -> tuple[Any, LLMQATResult]:
    """A copy of ``model`` (a Hugging Face decoder, left as it is) whose quantized linears were trained
    through ``plan``'s fake quantization to match ``model``'s next-token distribution on ``windows``
    (training text); the weights of the check with the lowest KL on ``held_out`` ship."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    start = time.perf_counter()
    student, weights = _fake_quantized(model, plan)
    result = LLMQATResult(config.steps, config.lr, sum(len(windows[i % len(windows)]) for i in range(config.steps)))
    optimizer = torch.optim.AdamW(weights, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(config.steps, 1))
    every = max(config.steps // max(config.checks, 1), 1)
    held_out_kl = HeldOutKL(model, held_out)
    result.held_out_kl[0] = held_out_kl(student)
    best = [w.detach().clone() for w in weights]
    student.train()
    for step in range(1, config.steps + 1):
        loss = _kl(model, student, torch.tensor([windows[(step - 1) % len(windows)]]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % every == 0 or step == config.steps:
            result.held_out_kl[step] = held_out_kl(student)
            if result.held_out_kl[step] < result.held_out_kl[result.best_step]:
                result.best_step = step
                best = [w.detach().clone() for w in weights]
    with torch.no_grad():
        for weight, kept in zip(weights, best):
            weight.copy_(kept)
            weight.requires_grad_(False)
    quantize_(student, QATConfig(step="convert"), filter_fn=None)
    result.seconds = time.perf_counter() - start
    return student.eval(), result
