"""Quantization-aware training with adaptive ranges, on a PT2E-prepared graph.

The schedule (all shares are of ``QATConfig.steps``):

1. calibration: a few batches with BatchNorm in inference form set every
   committed range (never the first training batch);
2. intermediate width: layers planned below 8 bits train with 8-bit weights
   for ``intermediate_share`` of the steps, then switch to their final width
   keeping their committed ranges (spec claim 8);
3. BatchNorm statistics freeze after ``freeze_bn`` (only when BatchNorm is
   kept in the graph, ``fold_bn=False``);
4. range observation freezes after ``freeze_ranges``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

from edgeq.configs import QATConfig
from edgeq.errors import EdgeqError
from edgeq.quant.configs import RangeConfig
from edgeq.quant.fake_quant import AdaptiveRangeFakeQuantize, start_tracking
from edgeq.quant.ranges import VoteConfig
from edgeq.recipe import Recipe, as_tuple

__all__ = ["AdaptiveRangeFakeQuantize", "QATConfig", "QATReport", "VoteConfig", "RangeConfig", "run_qat"]


@dataclass
class QATReport:
    steps: int
    seconds: float
    step_seconds: float
    first_loss: float
    last_loss: float
    commits: dict[str, int]
    losses: list[float]
    #: weight fake-quants trained at the intermediate width first, and for how many steps
    intermediate: dict[str, Any] = field(default_factory=dict)


def fake_quants(model: torch.nn.Module) -> dict[str, FakeQuantizeBase]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantizeBase)}


def set_observers(model: torch.nn.Module, enabled: bool) -> None:
    for fq in fake_quants(model).values():
        fq.enable_observer(enabled)


def to_eval(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Inference numerics: BatchNorm on running statistics, ranges frozen."""
    move_exported_model_to_eval(model)
    set_observers(model, False)
    return model


def world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batches(recipe: Recipe) -> Iterator:
    """Cycle over train_data(), calling it again at the end of each epoch.

    Under torch.distributed, rank r of w takes batches r, r + w, r + 2w, ...
    so that one step's global batch is w consecutive recipe batches.
    """
    rank, size = world()
    index = 0
    while True:
        empty = True
        for batch in recipe.train_data():
            empty = False
            if index % size == rank:
                yield batch
            index += 1
        if empty:
            raise EdgeqError(
                "train_data() yielded no batches", "make the recipe's train_data() yield (inputs, target) batches"
            )


def _set_weight_width(model: torch.nn.Module, narrow: dict[str, tuple[int, int]], bits: int | None) -> None:
    """Widen the narrow weight fake-quants to ``bits`` (None restores them)."""
    modules = dict(model.named_modules())
    for name, (qmin, qmax) in narrow.items():
        fq = modules[name]
        if bits is not None:
            top = 2 ** (bits - 1) - 1
            qmin, qmax = -top, top
        fq.quant_min, fq.quant_max = qmin, qmax
        post = getattr(fq, "activation_post_process", None)
        if post is not None:
            post.quant_min, post.quant_max = qmin, qmax
        if isinstance(fq, AdaptiveRangeFakeQuantize):
            fq._refresh_qparams()


def narrow_weight_quants(model: torch.nn.Module, below_bits: int = 8) -> dict[str, tuple[int, int]]:
    """Weight fake-quants narrower than ``below_bits`` and their (qmin, qmax)."""
    limit = 2 ** (below_bits - 1) - 1
    found = {}
    for name, fq in fake_quants(model).items():
        per_channel = getattr(fq, "ch_axis", -1) is not None and fq.qscheme in (
            torch.per_channel_symmetric,
            torch.per_channel_affine,
        )
        if per_channel and fq.quant_max < limit:
            found[name] = (fq.quant_min, fq.quant_max)
    return found


def calibrate(model: torch.fx.GraphModule, recipe: Recipe, batches: int, device: str = "cpu") -> int:
    """Set initial ranges from a few batches, with BatchNorm in inference form."""
    move_exported_model_to_eval(model)
    set_observers(model, True)
    seen = 0
    data = _batches(recipe)  # this rank's share; the trackers reduce observations across ranks
    with torch.no_grad():
        for inputs, _ in data:
            model(*(t.to(device) for t in as_tuple(inputs)))
            seen += 1
            if seen >= batches:
                break
    start_tracking(model)
    return seen


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL divergence to the teacher's distribution for logits (last dimension > 1), MSE otherwise."""
    if student.dim() >= 2 and student.shape[-1] > 1:
        return torch.nn.functional.kl_div(
            student.float().log_softmax(-1).flatten(0, -2),
            teacher.float().log_softmax(-1).flatten(0, -2),
            reduction="batchmean",
            log_target=True,
        )
    return torch.nn.functional.mse_loss(student.float(), teacher.float())


def qat_loss(
    kind: str,
    recipe: Recipe,
    output: torch.Tensor,
    target: Any,
    teacher: torch.nn.Module | None,
    inputs: tuple,
) -> torch.Tensor:
    """The loss a QAT step minimises: the recipe's task loss, distillation from the float model, or both."""
    total: torch.Tensor | None = None
    if kind in ("task", "both"):
        total = recipe.loss(output, target)
    if kind in ("distill", "both") and teacher is not None:
        with torch.no_grad():
            reference = recipe.score_output(teacher(*inputs))
        distill = distillation_loss(output, reference)
        total = distill if total is None else total + distill
    if total is None:
        raise EdgeqError(f"QAT loss '{kind}' has nothing to learn from", "pass the float model as teacher")
    return total


def run_qat(
    model: torch.fx.GraphModule,
    recipe: Recipe,
    config: QATConfig,
    on_step: Callable[[int, float], None] | None = None,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    resume: bool = False,
    teacher: torch.nn.Module | None = None,
) -> QATReport:
    """Train the prepared graph in place; returns what happened.

    With ``checkpoint``, the state (model with its range trackers, optimizer,
    schedule, RNG states, step) is saved there every ``checkpoint_every``
    steps; ``resume`` continues from it and ends exactly where an
    uninterrupted run would.
    """
    from edgeq.quant import checkpoint as ckpt

    if config.loss != "task" and teacher is None:
        raise EdgeqError(f"QAT loss '{config.loss}' needs the float model as teacher", "pass teacher= to run_qat")
    if teacher is not None:
        teacher = teacher.to(config.device).eval()
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model.to(device)
    saved = None
    if resume and checkpoint is not None and checkpoint.is_file():
        saved = ckpt.load(checkpoint)
        if saved.get("fingerprint") != fingerprint:
            raise EdgeqError(
                f"checkpoint {checkpoint} is from a different build (recipe, plan, target or QAT settings changed)",
                "rebuild without --resume, or restore the settings it was made with",
            )
    if saved is None:  # a checkpoint carries the calibrated, tracked ranges
        calibrate(model, recipe, config.calibration_batches, config.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    if config.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    steps = config.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
    )
    narrow = narrow_weight_quants(model, 8)
    inter_steps = int(round(config.intermediate_share * steps)) if narrow and config.intermediate_bits else 0
    freeze_bn_at = int(round(config.freeze_bn * steps)) if not config.fold_bn else steps + 1
    freeze_ranges_at = int(round(config.freeze_ranges * steps))
    first = 0
    losses: list[float] = []
    if saved is not None:
        first = int(saved["step"])
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        losses = list(saved["losses"])
        ckpt.set_rng_state(saved["rng"])
    if inter_steps and first < inter_steps:
        _set_weight_width(model, narrow, config.intermediate_bits)
    move_exported_model_to_train(model)
    if first >= freeze_bn_at:
        move_exported_model_to_eval(model)
    set_observers(model, first < freeze_ranges_at)
    batches = _batches(recipe)
    for _ in range(first):  # the data order is the recipe's: replay up to the checkpoint
        next(batches)
    rank, size = world()
    trainer = model
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Gradients are averaged across ranks; buffers (moving-average
        # observers, BatchNorm statistics) follow rank 0.
        trainer = DistributedDataParallel(  # type: ignore[assignment]
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    start = time.perf_counter()
    for step in range(first, steps):
        if inter_steps and step == inter_steps:
            _set_weight_width(model, narrow, None)
        if step == freeze_bn_at:
            # Inference-form BatchNorm from here on: running statistics frozen.
            move_exported_model_to_eval(model)
        if step == freeze_ranges_at:
            set_observers(model, False)
        inputs, target = next(batches)
        inputs = tuple(t.to(device) for t in as_tuple(inputs))
        target = target.to(device) if isinstance(target, torch.Tensor) else target
        opt.zero_grad(set_to_none=True)
        output = recipe.score_output(trainer(*inputs))
        loss = qat_loss(config.loss, recipe, output, target, teacher, inputs)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise EdgeqError(
                f"QAT loss became {value} at step {step}",
                "lower the learning rate (--lr) or check the training data for NaN/inf values",
            )
        loss.backward()
        opt.step()
        sched.step()
        losses.append(value)
        if (
            checkpoint is not None
            and rank == 0
            and config.checkpoint_every
            and (step + 1) % config.checkpoint_every == 0
            and step + 1 < steps
        ):
            ckpt.save(
                checkpoint,
                {
                    "fingerprint": fingerprint,
                    "step": step + 1,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "losses": losses,
                    "rng": ckpt.rng_state(),
                },
            )
        if on_step is not None:
            on_step(step, value)
    seconds = time.perf_counter() - start
    to_eval(model)
    model.to("cpu")
    commits = {
        name: fq.commits() for name, fq in fake_quants(model).items() if isinstance(fq, AdaptiveRangeFakeQuantize)
    }
    return QATReport(
        steps=steps,
        seconds=seconds,
        step_seconds=seconds / max(steps, 1),
        first_loss=losses[0] if losses else float("nan"),
        last_loss=losses[-1] if losses else float("nan"),
        commits=commits,
        losses=losses[:: max(1, steps // 100)],
        intermediate={
            "bits": config.intermediate_bits,
            "steps": inter_steps,
            "tensors": {name: list(r) for name, r in narrow.items()},
        }
        if inter_steps
        else {},
    )
