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

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

from edgeq import upstream
from edgeq.configs import QATConfig
from edgeq.errors import EdgeqError
from edgeq.quant.configs import RangeConfig
from edgeq.quant.fake_quant import AdaptiveRangeFakeQuantize, start_tracking
from edgeq.quant.ranges import VoteConfig
from edgeq.recipe import Recipe, as_tuple, output_leaves
from edgeq.samples import to_device

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
    #: the schedule's steps (``steps`` is where training actually ended)
    planned_steps: int = 0
    #: passes over the training batches the schedule asked for
    passes: float = 0.0
    #: (step, held-out loss) at each check; step 0 is the calibrated model before training
    holdout_losses: list[tuple[int, float]] = field(default_factory=list)
    #: the step whose state was kept (the best held-out loss)
    best_step: int | None = None
    stopped_early: bool = False
    warnings: list[str] = field(default_factory=list)
    #: initial activation ranges: held-out loss at min/max and at the histogram observer's, and the choice
    initial_ranges: dict[str, Any] = field(default_factory=dict)
    #: when --lr-candidates searched the rate: the short runs' length, each rate's best held-out
    #: loss ("losses") and the rate picked
    rate_search: dict[str, Any] = field(default_factory=dict)


@dataclass
class Schedule:
    """How long QAT trains, resolved against the recipe's data."""

    steps: int
    #: batches per pass that train, and that are held out
    train_batches: int
    holdout_batches: int
    samples: int
    #: steps between held-out checks (0: no checks)
    check_every: int
    #: every this-many-th training batch is held out (0: none; see :func:`is_held_out`)
    holdout: int = 0

    @property
    def passes(self) -> float:
        return self.steps / max(self.train_batches, 1)


#: more passes than this over the training data draws a warning: the model may memorise it
MANY_PASSES = 20


#: the hold-out stride never goes below this for the sake of min_holdout_samples: at most a third
#: of the training batches is held out
_MIN_STRIDE = 3


def holdout_every(config: QATConfig, batches: int, samples: int = 0) -> int:
    """Every k-th training batch is held out (0: none): a fixed, order-independent slice.

    ``--holdout``'s share sets k; when that slice would hold fewer than ``min_holdout_samples``
    (``samples``: the training samples in ``batches``) and a third of the batches would hold
    enough, k shrinks until it does, since 25 photos cannot tell candidates apart that differ by
    a few photos in 250. A set too small for that keeps the share as asked.
    """
    if not config.holdout or batches < 2:
        return 0
    every = max(2, round(1.0 / config.holdout))
    per_batch = samples / batches if samples else 0.0

    def enough(stride: int) -> bool:
        return (batches // stride) * per_batch >= config.min_holdout_samples

    if not samples or enough(every) or not enough(min(every, _MIN_STRIDE)):
        return every  # enough already, or too little data for a third to be enough: the share as asked
    while not enough(every):
        every -= 1
    return every


def is_held_out(index: int, every: int) -> bool:
    return every > 0 and index % every == every - 1


def schedule(recipe: Recipe, config: QATConfig) -> Schedule:
    """Count the recipe's training batches once and resolve steps, hold-out and check interval."""
    batches = samples = 0
    for inputs, _ in recipe.train_data():
        batches += 1
        first = as_tuple(inputs)[0]
        samples += int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1
    if batches == 0:
        raise EdgeqError(
            "train_data() yielded no batches", "make the recipe's train_data() yield (inputs, target) batches"
        )
    every = holdout_every(config, batches, samples)
    held = sum(is_held_out(i, every) for i in range(batches))
    train = batches - held
    steps = config.steps if config.steps is not None else int(math.ceil(config.epochs * train))
    check = 0
    if held and config.patience and steps:
        check = max(1, min(train, math.ceil(steps / 10)))
    return Schedule(
        steps=steps, train_batches=train, holdout_batches=held, samples=samples, check_every=check, holdout=every
    )


def fake_quants(model: torch.nn.Module) -> dict[str, FakeQuantizeBase]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantizeBase)}


def set_observers(model: torch.nn.Module, enabled: bool) -> None:
    for fq in fake_quants(model).values():
        # A dynamically quantized input is measured on every call in the program, so its
        # fake-quant keeps measuring too: frozen, it would replay the last batch's range.
        fq.enable_observer(enabled or bool(getattr(fq, "is_dynamic", False)))


def to_eval(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Inference numerics: BatchNorm on running statistics, ranges frozen."""
    upstream.move_to_eval(model)
    set_observers(model, False)
    return model


def trained_float(
    model: torch.nn.Module, prepared: torch.fx.GraphModule, keep: tuple[str, ...] = ()
) -> torch.nn.Module | None:
    """A copy of the float ``model`` holding the weights QAT trained in ``prepared``.

    Parameters are matched by name; ``keep`` names parameters left as the model had them
    (embedding tables, which prepare rounds to their grid in place). None when the graph's
    parameters are not the model's own: BatchNorm folded into convs changes both the conv
    weights and the parameter set, and those weights cannot go back into an unfolded model.
    """
    own = dict(model.named_parameters())
    trained = dict(prepared.named_parameters())
    if set(own) != set(trained) or any(own[name].shape != trained[name].shape for name in own):
        return None
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in copy_.named_parameters():
            if name not in keep:
                param.copy_(trained[name].detach().to(param.device, param.dtype))
    return copy_.eval()


def world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batches(recipe: Recipe, holdout: int = 0) -> Iterator:
    """Cycle over train_data()'s training batches (held-out ones skipped), calling it again each epoch.

    Under torch.distributed, rank r of w takes batches r, r + w, r + 2w, ...
    so that one step's global batch is w consecutive recipe batches.
    """
    rank, size = world()
    index = 0
    while True:
        empty = True
        for position, batch in enumerate(recipe.train_data()):
            empty = False
            if is_held_out(position, holdout):
                continue
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
        if isinstance(fq, AdaptiveRangeFakeQuantize):
            fq.set_width(qmin, qmax)
            continue
        fq.quant_min, fq.quant_max = qmin, qmax
        post = getattr(fq, "activation_post_process", None)
        if post is not None:
            post.quant_min, post.quant_max = qmin, qmax


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


def held_out_batches(recipe: Recipe, holdout: int) -> list:
    """The held-out slice of train_data() (empty when nothing is held out)."""
    if not holdout:
        return []
    return [batch for i, batch in enumerate(recipe.train_data()) if is_held_out(i, holdout)]


def _activation_quants(model: torch.fx.GraphModule) -> dict[str, AdaptiveRangeFakeQuantize]:
    """Per-tensor adaptive fake-quants on activations (not on a weight constant)."""
    found = {}
    modules = dict(model.named_modules())
    for node in model.graph.nodes:
        if node.op != "call_module":
            continue
        fq = modules.get(str(node.target))
        if not isinstance(fq, AdaptiveRangeFakeQuantize) or fq.ch_axis >= 0:
            continue
        source = node.args[0] if node.args else None
        if isinstance(source, torch.fx.Node) and source.op != "get_attr":
            found[str(node.target)] = fq
    return found


def _histogram_ranges(observers: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    ranges = {}
    for name, observer in observers.items():
        if observer.min_val.numel() == 0 or not torch.isfinite(observer.min_val).all():
            continue
        scale, zero_point = observer.calculate_qparams()
        low = (observer.quant_min - zero_point.float()) * scale
        high = (observer.quant_max - zero_point.float()) * scale
        ranges[name] = (low.reshape(1), high.reshape(1))
    return ranges


def calibrate(
    model: torch.fx.GraphModule,
    recipe: Recipe,
    batches: int,
    device: str = "cpu",
    holdout: int = 0,
    held: HeldOut | None = None,
) -> dict[str, Any]:
    """Set initial ranges from a few batches, with BatchNorm in inference form.

    Activation ranges start either at the calibration min/max or where a histogram observer
    (XNNPACK's own PTQ observer, which clips outliers to minimise the quantization error)
    puts them; with held-out batches the build measures both and starts from the better,
    otherwise from min/max. Returns what was measured and chosen.
    """
    from torchao.quantization.pt2e.observer import HistogramObserver

    upstream.move_to_eval(model)
    set_observers(model, True)
    activations = _activation_quants(model) if held else {}
    observers = {}
    for name, fq in activations.items():
        if fq.quant_max - fq.quant_min > 255:
            continue  # 16-bit activations: clipping buys little, and the observer takes 8 bits only
        observers[name] = HistogramObserver(dtype=torch.int8, quant_min=fq.quant_min, quant_max=fq.quant_max).to(device)
    modules = dict(model.named_modules())

    def feed(name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            observers[name](args[0].detach())

        return hook

    handles = [modules[name].register_forward_pre_hook(feed(name)) for name in observers]
    seen = 0
    data = _batches(recipe, holdout)  # this rank's share; the trackers reduce observations across ranks
    try:
        with torch.no_grad():
            for inputs, _ in data:
                model(*(t.to(device) for t in as_tuple(inputs)))
                seen += 1
                if seen >= batches:
                    break
    finally:
        for handle in handles:
            handle.remove()
    chosen: dict[str, Any] = {"batches": seen, "chosen": "minmax"}
    histogram = _histogram_ranges(observers)
    if held and histogram:
        set_observers(model, False)
        chosen["minmax"] = held.loss(model)
        minmax = {name: activations[name].committed_range() for name in histogram}
        for name, (low, high) in histogram.items():
            activations[name].set_range(low, high)
        chosen["histogram"] = held.loss(model)
        if chosen["histogram"] < chosen["minmax"]:
            chosen["chosen"] = "histogram"
        else:
            for name, (low, high) in minmax.items():
                activations[name].set_range(low, high)
        set_observers(model, True)
    start_tracking(model)
    return chosen


class QATDiverged(EdgeqError):
    """The QAT loss became NaN or infinite."""


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL divergence to the teacher's distribution for logits ([batch, classes], classes > 1);
    otherwise mean squared error with each channel (dim 1 of a [B, C, H, W] map, the last dim of
    [B, N, C] rows) divided by the teacher's variance of that channel on the batch. A detector's
    output mixes box coordinates in pixels with probabilities in 0..1: a plain MSE would weigh a
    pixel 1,000 times a probability, a softmax over its last dimension means nothing."""
    if student.dim() == 2 and student.shape[-1] > 1:
        return torch.nn.functional.kl_div(
            student.float().log_softmax(-1).flatten(0, -2),
            teacher.float().log_softmax(-1).flatten(0, -2),
            reduction="batchmean",
            log_target=True,
        )
    if student.dim() < 3:
        return torch.nn.functional.mse_loss(student.float(), teacher.float())
    channel = 1 if student.dim() == 4 else -1
    s = student.float().movedim(channel, -1).flatten(0, -2)
    t = teacher.float().movedim(channel, -1).flatten(0, -2)
    # A channel varying less than the median channel gets the median's weight: a rare class's
    # near-constant probability would otherwise weigh thousands of times the rest and throw QAT
    # off (measured on FastestDet: 80 class channels with variances down to 1e-5).
    variance = t.detach().var(dim=0, unbiased=False)
    floor = variance.median().clamp(min=1e-8)
    return ((s - t).pow(2) / torch.maximum(variance, floor)).mean()


def qat_loss(
    kind: str,
    recipe: Recipe,
    output: torch.Tensor,
    target: Any,
    teacher: torch.nn.Module | None,
    inputs: tuple,
) -> torch.Tensor:
    """The loss a QAT step minimises: the recipe's task loss, distillation from the float model, or
    both; ``output`` is the model's whole output (every output distils, see :func:`objective`)."""
    reference = None
    if kind in ("distill", "both") and teacher is not None:
        with torch.no_grad():
            reference = teacher(*inputs)
    return objective(kind, recipe, output, target, reference)


def objective(kind: str, recipe: Recipe, output: Any, target: Any, reference: Any | None) -> torch.Tensor:
    """:func:`combined_loss` on the scored output, plus, when distilling, :func:`distillation_loss`
    on each of the model's other outputs against the float model's: a detector's or multi-head
    model's second output is shipped too and must not drift while the first is trained."""
    scored = recipe.score_output(output)
    scored_reference = recipe.score_output(reference) if reference is not None else None
    total = combined_loss(kind, recipe, scored, target, scored_reference)
    if kind in ("distill", "both") and reference is not None:
        for mine, theirs in zip(output_leaves(output), output_leaves(reference)):
            if mine is not scored and mine.is_floating_point() and mine.shape == theirs.shape:
                total = total + distillation_loss(mine, theirs)
    return total


def _sample(output: Any, i: int) -> Any:
    """Sample ``i`` of every tensor in a model's output (batch on dim 0)."""
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda t: t[i : i + 1] if isinstance(t, torch.Tensor) else t, output)


def combined_loss(
    kind: str, recipe: Recipe, output: torch.Tensor, target: Any, reference: torch.Tensor | None
) -> torch.Tensor:
    """``kind``'s loss given the float model's output ``reference`` (None: no teacher)."""
    total: torch.Tensor | None = None
    if kind in ("task", "both"):
        total = recipe.loss(output, target)
    if kind in ("distill", "both") and reference is not None:
        # a task that knows its output's meaning (a segmenter's per-pixel classes) distils its own way
        distill = getattr(recipe.postprocessing, "distillation_loss", distillation_loss)(output, reference)
        total = distill if total is None else total + distill
    if total is None:
        raise EdgeqError(f"QAT loss '{kind}' has nothing to learn from", "pass the float model as teacher")
    return total


class HeldOut:
    """The loss QAT minimises, measured on the held-out batches with everything frozen."""

    def __init__(self, kind: str, recipe: Recipe, batches: list, teacher: torch.nn.Module | None, device: str):
        self.kind, self.recipe, self.device = kind, recipe, torch.device(device)
        self.batches = []
        with torch.no_grad():
            for inputs, target in batches:
                inputs = tuple(t.to(self.device) for t in as_tuple(inputs))
                target = to_device(target, self.device)
                reference = teacher(*inputs) if teacher is not None else None  # every output
                self.batches.append((inputs, target, reference))

    def __bool__(self) -> bool:
        return bool(self.batches)

    @torch.no_grad()
    def loss(self, model: Callable) -> float:
        total = 0.0
        for inputs, target, reference in self.batches:
            total += float(objective(self.kind, self.recipe, model(*inputs), target, reference))
        return total / len(self.batches)

    @torch.no_grad()
    def loss_and_samples(self, model: Callable) -> tuple[float, torch.Tensor]:
        """:meth:`loss`, and the same loss per held-out sample (for paired tests between candidates),
        from one pass of ``model`` over the held-out batches."""
        total, values = 0.0, []
        for inputs, target, reference in self.batches:
            output = model(*inputs)
            total += float(objective(self.kind, self.recipe, output, target, reference))
            for i in range(int(self.recipe.score_output(output).shape[0])):
                one_reference = _sample(reference, i) if reference is not None else None
                values.append(
                    float(objective(self.kind, self.recipe, _sample(output, i), target[i : i + 1], one_reference))
                )
        return total / len(self.batches), torch.tensor(values)


def _frozen_loss(model: torch.fx.GraphModule, held: HeldOut, observing: bool, bn_training: bool) -> float:
    """Held-out loss with inference numerics, leaving the training state as it was."""
    upstream.move_to_eval(model)
    set_observers(model, False)
    try:
        return held.loss(model)
    finally:
        if bn_training:
            upstream.move_to_train(model)
        set_observers(model, observing)


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def restore_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)`` for any exported graph: entries equal to what the model holds
    are left out. An exported graph's lifted constants (a detector's anchor grid made with
    ``expand()``) are state-dict entries whose elements share memory, which load_state_dict
    refuses to write; training never changes them. What changed goes through load_state_dict,
    which also resizes observer statistics that were empty when the model was made."""
    current = model.state_dict()
    extra = sorted(set(state) ^ set(current))
    if extra:
        raise RuntimeError(f"state does not match the model: {extra[:5]}")
    changed = {
        name: value
        for name, value in state.items()
        if current[name].shape != value.shape or not torch.equal(current[name], value.to(current[name].device))
    }
    model.load_state_dict(changed, strict=False)


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
    uninterrupted run would. With ``config.dropout`` False every dropout of
    the graph trains at rate 0.
    """
    rates = upstream.record_dropout_rates(model)
    if not config.dropout:
        model.meta[upstream.DROPOUT_RATES] = [0.0] * len(rates)
    try:
        return _run_qat(model, recipe, config, on_step, checkpoint, fingerprint, resume, teacher)
    finally:
        model.meta[upstream.DROPOUT_RATES] = rates


def _run_qat(
    model: torch.fx.GraphModule,
    recipe: Recipe,
    config: QATConfig,
    on_step: Callable[[int, float], None] | None,
    checkpoint: Path | None,
    fingerprint: str,
    resume: bool,
    teacher: torch.nn.Module | None,
) -> QATReport:
    if config.loss != "task" and teacher is None:
        raise EdgeqError(f"QAT loss '{config.loss}' needs the float model as teacher", "pass teacher= to run_qat")
    plan = schedule(recipe, config)
    warnings: list[str] = []
    if plan.passes > MANY_PASSES:
        warnings.append(
            f"QAT runs {plan.steps} steps, {plan.passes:.0f} passes over {plan.samples} training samples: "
            "it may memorise them; add training data or lower --steps"
        )
    if teacher is not None:
        teacher = teacher.to(config.device).eval()
    torch.manual_seed(config.seed)
    model.to(torch.device(config.device))
    saved = _resumed(checkpoint, fingerprint) if resume else None
    run = _Training(model, recipe, config, plan, teacher)
    initial: dict[str, Any] = {}
    if saved is None:  # a checkpoint carries the calibrated, tracked ranges
        # Under torch.distributed each rank's histogram would see its own share: min/max there.
        held = run.held if world()[1] == 1 else None
        initial = calibrate(model, recipe, config.calibration_batches, config.device, plan.holdout, held)
    run.make_optimizer()
    run.start(saved)
    start = time.perf_counter()
    for step in range(run.first, plan.steps):
        try:
            value = run.step(step)
        except QATDiverged:
            if run.best is None:
                raise
            run.diverged = True  # the failed step's forward may have fed NaN to BatchNorm's statistics
            # QAT is one candidate of several: a run that diverged keeps its best held-out state
            # (the calibrated model at worst) and the selection compares it with the others.
            warnings.append(
                f"QAT loss became non-finite at step {step + 1} (lr {config.lr:g}): training stopped and "
                f"kept its best held-out state (step {run.best['step']}); a lower --lr may let QAT help"
            )
            break
        stop = run.check(step + 1)
        if checkpoint is not None and run.checkpoint_due(step + 1):
            run.save(checkpoint, fingerprint, step + 1)
        if on_step is not None:
            on_step(step, value)
        if stop:
            break
    seconds = time.perf_counter() - start
    run.finish()
    return run.report(seconds, warnings, initial)


def _resumed(checkpoint: Path | None, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint a killed build left, when it is this build's; None when there is none."""
    from edgeq.quant import checkpoint as ckpt

    if checkpoint is None or not checkpoint.is_file():
        return None
    saved = ckpt.load(checkpoint)
    if saved.get("fingerprint") != fingerprint:
        raise EdgeqError(
            f"checkpoint {checkpoint} is from a different build (recipe, plan, target or QAT settings changed)",
            "rebuild without --resume, or restore the settings it was made with",
        )
    return saved


class _Training:
    """One QAT run: its phases (intermediate width, BatchNorm and range freezing), optimizer,
    held-out checks with the best state kept, and the losses so far."""

    def __init__(
        self, model: torch.fx.GraphModule, recipe: Recipe, config: QATConfig, plan: Schedule, teacher: Any
    ) -> None:
        self.model, self.recipe, self.config, self.plan, self.teacher = model, recipe, config, plan, teacher
        self.device = torch.device(config.device)
        self.held = HeldOut(config.loss, recipe, held_out_batches(recipe, plan.holdout), teacher, config.device)
        self.first = 0
        self.losses: list[float] = []
        self.checks: list[tuple[int, float]] = []
        self.best: dict[str, Any] | None = None  # {"step", "loss", "state"}
        self.diverged = False
        self.stale = 0

    def make_optimizer(self) -> None:
        config, steps = self.config, self.plan.steps
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt: torch.optim.Optimizer
        if config.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
        )
        self.narrow = narrow_weight_quants(self.model, 8)
        self.inter_steps = (
            int(round(config.intermediate_share * steps)) if self.narrow and config.intermediate_bits else 0
        )
        self.freeze_bn_at = int(round(config.freeze_bn * steps)) if not config.fold_bn else steps + 1
        self.freeze_ranges_at = int(round(config.freeze_ranges * steps))

    def start(self, saved: dict[str, Any] | None) -> None:
        """Restore a checkpoint, or check the calibrated model (a candidate too: QAT that only makes it
        worse keeps it); enter the phase of the first step; replay the data order up to it."""
        from edgeq.quant import checkpoint as ckpt

        model = self.model
        if saved is not None:
            self.first = int(saved["step"])
            restore_state(model, saved["model"])
            self.opt.load_state_dict(saved["optimizer"])
            self.sched.load_state_dict(saved["scheduler"])
            self.losses = list(saved["losses"])
            self.checks = [tuple(c) for c in saved.get("checks", [])]  # type: ignore[misc]
            self.best, self.stale = saved.get("best"), int(saved.get("stale", 0))
            ckpt.set_rng_state(saved["rng"])
        elif self.plan.check_every and self.held:
            value = _frozen_loss(model, self.held, observing=False, bn_training=False)
            self.checks.append((0, value))
            self.best = {"step": 0, "loss": value, "state": _state_copy(model)}
        if self.inter_steps and self.first < self.inter_steps:
            _set_weight_width(model, self.narrow, self.config.intermediate_bits)
        upstream.move_to_train(model)
        if self.first >= self.freeze_bn_at:
            upstream.move_to_eval(model)
        set_observers(model, self.first < self.freeze_ranges_at)
        self.batches = _batches(self.recipe, self.plan.holdout)
        for _ in range(self.first):  # the data order is the recipe's: replay up to the checkpoint
            next(self.batches)
        self.trainer: torch.nn.Module = model
        if world()[1] > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Gradients are averaged across ranks; buffers (moving-average
            # observers, BatchNorm statistics) follow rank 0.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.trainer = DistributedDataParallel(model, device_ids=device_ids)

    def step(self, step: int) -> float:
        """One optimizer step (after this step's phase change); returns its loss."""
        model, device = self.model, self.device
        if self.inter_steps and step == self.inter_steps:
            _set_weight_width(model, self.narrow, None)
        if step == self.freeze_bn_at:
            # Inference-form BatchNorm from here on: running statistics frozen.
            upstream.move_to_eval(model)
        if step == self.freeze_ranges_at:
            set_observers(model, False)
        inputs, target = next(self.batches)
        inputs = tuple(t.to(device) for t in as_tuple(inputs))
        target = to_device(target, device)
        self.opt.zero_grad(set_to_none=True)
        # Grad on whatever the data generator left set: one that yields inside `with torch.no_grad()`
        # (computing a teacher's targets) switches it off in this frame between its batches.
        with torch.enable_grad():
            output = self.trainer(*inputs)  # every output: the scored one is the recipe's loss, all distil
            loss = qat_loss(self.config.loss, self.recipe, output, target, self.teacher, inputs)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise QATDiverged(
                f"QAT loss became {value} at step {step}",
                "lower the learning rate (--lr) or check the training data for NaN/inf values",
            )
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.losses.append(value)
        return value

    def check(self, done: int) -> bool:
        """The held-out check due after ``done`` steps, if any; whether training should stop."""
        plan = self.plan
        # Checks compare the planned widths only: none while narrow layers train at the intermediate width.
        final_width = not self.inter_steps or done > self.inter_steps
        if plan.check_every and self.held and final_width and (done % plan.check_every == 0 or done == plan.steps):
            observing = done < self.freeze_ranges_at
            value = _frozen_loss(self.model, self.held, observing=observing, bn_training=done < self.freeze_bn_at)
            self.checks.append((done, value))
            if self.best is None or value < self.best["loss"]:
                self.best, self.stale = {"step": done, "loss": value, "state": _state_copy(self.model)}, 0
            else:
                self.stale += 1
        return bool(self.config.patience) and self.stale >= self.config.patience

    def checkpoint_due(self, done: int) -> bool:
        every = self.config.checkpoint_every
        return world()[0] == 0 and bool(every) and done % every == 0 and done < self.plan.steps

    def save(self, checkpoint: Path, fingerprint: str, done: int) -> None:
        from edgeq.quant import checkpoint as ckpt

        state = {
            "fingerprint": fingerprint,
            "step": done,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "losses": self.losses,
            "rng": ckpt.rng_state(),
            "checks": self.checks,
            "best": self.best,
            "stale": self.stale,
        }
        ckpt.save(checkpoint, state)

    def finish(self) -> None:
        """Planned widths, the best checked state, inference form, back on the CPU."""
        model, trained = self.model, len(self.losses)
        if self.inter_steps and trained <= self.inter_steps:
            _set_weight_width(model, self.narrow, None)
        if self.best is not None and (self.best["step"] != trained or self.diverged):
            restore_state(model, self.best["state"])
        to_eval(model)
        model.to("cpu")

    def report(self, seconds: float, warnings: list[str], initial: dict[str, Any]) -> QATReport:
        losses, steps, trained = self.losses, self.plan.steps, len(self.losses)
        commits = {
            name: fq.commits()
            for name, fq in fake_quants(self.model).items()
            if isinstance(fq, AdaptiveRangeFakeQuantize)
        }
        intermediate = {
            "bits": self.config.intermediate_bits,
            "steps": self.inter_steps,
            "tensors": {name: list(r) for name, r in self.narrow.items()},
        }
        return QATReport(
            steps=trained,
            seconds=seconds,
            step_seconds=seconds / max(trained - self.first, 1),
            first_loss=losses[0] if losses else float("nan"),
            last_loss=losses[-1] if losses else float("nan"),
            commits=commits,
            losses=losses[:: max(1, steps // 100)],
            intermediate=intermediate if self.inter_steps else {},
            planned_steps=steps,
            passes=self.plan.passes,
            holdout_losses=self.checks,
            best_step=self.best["step"] if self.best is not None else None,
            stopped_early=trained < steps,
            warnings=warnings,
            initial_ranges=initial,
        )
