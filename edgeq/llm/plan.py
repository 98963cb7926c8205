"""Per-layer precision for decoders: each linear scored by what each precision costs the next-token loss.

The analysis puts one linear at a time at each precision the planner may
choose (a copy made as the program will hold it: the very torchao config, so
activations are quantized dynamically as XNNPACK runs them; float16 as
XNNPACK's fp16 kernels run it) and measures the mean next-token loss on
windows of the recipe's *training* text (never ``eval_text()``, which only
reports): fp16 and 8-bit dynamic (``wide``), 4-bit in groups of 32 (``narrow``
adds larger groups: fewer scales, more loss). The planner starts from float
everywhere and takes moves (a linear from its precision to the next smaller
one on its lower convex hull of bytes against loss: float -> fp16 -> w8dyn ->
w4g32 -> ...) in order of loss increase per byte saved, while the summed
increase keeps the predicted perplexity within ``max_increase`` (a share: 0.05
is 5% above float) or until the program fits ``size_budget`` bytes. A linear
whose 8-bit dynamic activations cost more than the budget allows stays at fp16
or float.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from edgeq.llm.convert import executorch_name
from edgeq.llm.export import LINEAR, LLMPlan
from edgeq.llm.gptq import Hessians, apply_gptq
from edgeq.llm.suffix import BlockInputs, token_losses
from edgeq.llm.zero_points import zero_point_bytes, zero_points_fit

__all__ = [
    "LayerCost", "LLMAnalysis", "PlanCheck", "analyze_llm", "check_plan", "measure_plan", "plan_llm", "quantized_copy",
    "weight_bytes",
]  # fmt: skip

#: precisions the planner chooses between, widest first: every linear starts at START; an analysis
#: that did not measure WIDE (older reports) prices it at no loss, as the planner once assumed
START, HALF, WIDE, NARROW = "float", "fp16", "w8dyn", "w4g32"


def weight_bytes(params: int, rows: int, precision: str, zero_points: bool = False) -> float:
    """A linear's bytes in the program: integer weights and their float32 scales (and, for 4-bit
    groups with ``zero_points``, the 8-bit offsets linear beside them)."""
    if precision == "float":
        return 4.0 * params
    if precision == HALF:
        return 2.0 * params
    if precision.startswith("w4g"):
        group = int(precision[3:])
        return 0.5 * params + 4.0 * params / group + (zero_point_bytes(params, rows, group) if zero_points else 0.0)
    return 1.0 * params + 4.0 * rows


@dataclass
class LayerCost:
    name: str
    params: int
    rows: int
    #: mean next-token loss increase (nats) with this linear alone at NARROW
    narrow_loss: float
    #: the same at each precision the analysis measured (HALF, WIDE and the 4-bit ones, NARROW among them)
    losses: dict[str, float] = field(default_factory=dict)
    #: each loss's standard error: of the per-token differences from float on the same tokens
    errors: dict[str, float] = field(default_factory=dict)
    #: the 4-bit precisions' losses and errors on asymmetric groups, when the analysis measured both
    #: grids (LLMAnalysis.zero_points None); ``losses`` then holds the symmetric ones
    zero_point_losses: dict[str, float] = field(default_factory=dict)
    zero_point_errors: dict[str, float] = field(default_factory=dict)


@dataclass
class LLMAnalysis:
    float_loss: float
    tokens: int
    layers: list[LayerCost] = field(default_factory=list)
    seconds: float = 0.0
    #: NARROW measured (and planned) with asymmetric groups (edgeq.llm.zero_points); None: both
    #: grids measured, :meth:`on` picks one to plan with
    zero_points: bool | None = False
    #: whether each measurement ran only the changed linear's block and the ones after it
    #: (edgeq.llm.suffix)
    from_block: bool = False

    def on(self, zero_points: bool) -> LLMAnalysis:
        """This analysis with the 4-bit losses of one grid (both measured: ``zero_points`` None)."""
        if self.zero_points is not None:
            if self.zero_points != zero_points:
                raise ValueError(f"the analysis measured zero_points={self.zero_points} only")
            return self
        layers = []
        for layer in self.layers:
            losses = _grid(layer.losses, layer.zero_point_losses) if zero_points else dict(layer.losses)
            errors = _grid(layer.errors, layer.zero_point_errors) if zero_points else dict(layer.errors)
            layers.append(LayerCost(layer.name, layer.params, layer.rows, losses.get(NARROW, math.inf), losses, errors))
        return LLMAnalysis(self.float_loss, self.tokens, layers, self.seconds, zero_points, self.from_block)

    def to_dict(self) -> dict[str, Any]:
        return {
            "float_loss": self.float_loss,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "narrow": NARROW,
            "zero_points": self.zero_points,
            "from_block": self.from_block,
            "layers": [vars(layer) for layer in self.layers],
        }


def _grid(measured: dict[str, float], zero_points: dict[str, float]) -> dict[str, float]:
    """``measured`` with its 4-bit entries those of ``zero_points`` (none where it has none)."""
    return {**{k: v for k, v in measured.items() if not k.startswith("w4g")}, **zero_points}


def _loss(model: Any, windows: list[list[int]], predictions: list[torch.Tensor] | None = None) -> float:
    losses = token_losses(model, windows, predictions)
    return float(losses.double().mean()) if len(losses) else 0.0


def linear_modules(model: Any) -> dict[str, str]:
    """The HF model's linears that ExecuTorch's transformer has: HF name -> ExecuTorch name."""
    names = {}
    for name, module in model.named_modules():
        target = executorch_name(name)
        if isinstance(module, torch.nn.Linear) and target is not None:
            names[name] = target
    return names


def quantized_copy(
    module: torch.nn.Module, target: str, precision: str, hessians: Hessians | None, zero_points: bool
) -> torch.nn.Module:
    """A copy of one linear (``target``: its ExecuTorch name) quantized at ``precision`` as the program
    will hold it (GPTQ's integers with ``hessians``; split for its zero points with ``zero_points``)."""
    from edgeq.llm.export import quantize_layers, zero_point_layer

    if zero_points and precision.startswith("w4g"):
        return zero_point_layer(module, precision, hessians, target)
    quantized = quantize_layers(copy.deepcopy(module), LLMPlan({"": precision}, "float"))
    if hessians is not None:
        apply_gptq(quantized, target, hessians)
    return quantized


def _swap(model: Any, name: str, module: torch.nn.Module) -> torch.nn.Module:
    """Put ``module`` at ``name`` in ``model``; returns what was there."""
    previous = model.get_submodule(name)
    model.set_submodule(name, module)
    return previous


def analyze_llm(
    model: Any,
    windows: list[list[int]],
    hessians: Hessians | None = None,
    zero_points: bool | None = False,
    skip: frozenset[str] = frozenset(),
    narrow: tuple[str, ...] = (NARROW,),
    wide: tuple[str, ...] = (HALF, WIDE),
) -> LLMAnalysis:
    """Each linear's loss increase at each of ``wide`` and of ``narrow`` (4-bit precisions, NARROW among
    them) whose group size divides its input width, one linear at a time, on ``windows`` (the training
    text); with ``hessians``, each quantized the way the program will be (GPTQ integers);
    ``zero_points``: on asymmetric groups (None: on both grids, the symmetric one in ``losses``);
    ``skip``: ExecuTorch names of linears the plan does not choose for (not scored). A linear no
    group size divides gets no 4-bit moves (an infinite NARROW loss). Each measurement runs the
    changed linear's block and the ones after it (edgeq.llm.suffix)."""
    if NARROW not in narrow or not all(p.startswith("w4g") for p in narrow):
        raise ValueError(f"narrow {narrow} must be 4-bit precisions including {NARROW}")
    if not set(wide) <= {HALF, WIDE}:
        raise ValueError(f"wide {wide} must be among {HALF}, {WIDE}")
    start = time.perf_counter()
    inputs = BlockInputs(model, windows)
    base = inputs.base.double()
    analysis = LLMAnalysis(float(base.mean()), len(base), zero_points=zero_points, from_block=inputs.enabled)
    grids = (False, True) if zero_points is None else (zero_points,)
    for name, target in linear_modules(model).items():
        if target in skip:
            continue
        module = model.get_submodule(name)
        block = inputs.block_of(module)
        fits = [p for p in narrow if module.in_features % int(p[3:]) == 0]  # a group spans whole rows
        layer = LayerCost(target, module.weight.numel(), module.weight.shape[0], math.inf)
        for precision, grid in [*((p, grids[0]) for p in wide), *((p, g) for p in fits for g in grids)]:
            if grid and precision.startswith("w4g") and not zero_points_fit(module.in_features, int(precision[3:])):
                continue
            _swap(model, name, quantized_copy(module, target, precision, hessians, grid))
            try:
                change = inputs.losses(block).double() - base  # paired: the same tokens
            finally:
                _swap(model, name, module)
            second = zero_points is None and grid  # the zero points of an analysis of both grids
            losses = layer.zero_point_losses if second else layer.losses
            errors = layer.zero_point_errors if second else layer.errors
            losses[precision] = float(change.mean())
            errors[precision] = float(change.std() / math.sqrt(len(change))) if len(change) > 1 else 0.0
        layer.narrow_loss = layer.losses.get(NARROW, math.inf)
        analysis.layers.append(layer)
    analysis.seconds = time.perf_counter() - start
    return analysis


def _moves(layer: LayerCost, zero_points: bool) -> list[tuple[str, float, float, float]]:
    """(precision, bytes saved, loss added, its bound) for each step of ``layer`` from START down the
    lower convex hull of its (bytes, bound) points, a precision's bound being its measured loss plus
    one standard error (never below a wider precision's): a precision that costs more per byte than a
    smaller one is skipped, so each step's bound per byte is at least the one before it. Bounds, not
    means, so that on a few hundred tokens a move measured below its noise (a negative mean) is not
    priced free ahead of one measured small and sure (fp16's); the loss added is the difference of the
    measured means (each never below a wider precision's), what the prediction sums."""
    start = weight_bytes(layer.params, layer.rows, START)
    points = [(start, 0.0, START)]
    # an analysis of one precision (older reports, tests) fills only narrow_loss
    losses = dict(layer.losses or ({NARROW: layer.narrow_loss} if math.isfinite(layer.narrow_loss) else {}))
    losses.setdefault(WIDE, 0.0)
    for precision, loss in sorted(losses.items(), key=lambda item: -weight_bytes(layer.params, layer.rows,
                                                                               item[0], zero_points)):  # fmt: skip
        bound = max(loss + layer.errors.get(precision, 0.0), points[-1][1])
        point = (weight_bytes(layer.params, layer.rows, precision, zero_points), bound, precision)
        while len(points) > 1 and _slope(points[-2], points[-1]) >= _slope(points[-1], point):
            points.pop()  # the middle point sits above the line from its neighbours
        points.append(point)
    means = [0.0]
    for point in points[1:]:
        means.append(max(losses[point[2]], means[-1]))
    steps = zip(points, points[1:], means, means[1:])
    return [(b[2], a[0] - b[0], mean_b - mean_a, b[1] - a[1]) for a, b, mean_a, mean_b in steps]


def _slope(a: tuple[float, float, str], b: tuple[float, float, str]) -> float:
    return (b[1] - a[1]) / max(a[0] - b[0], 1e-9)


def plan_llm(
    analysis: LLMAnalysis, embedding: str, max_increase: float | None, size_budget: float | None
) -> tuple[LLMPlan, dict[str, Any]]:
    """The plan, and the planner's prediction: layers move from START down their precisions (see
    :func:`_moves`), cheapest loss per byte saved first, within ``max_increase`` (predicted perplexity
    ratio - 1) or until the linears fit ``size_budget`` bytes."""
    if analysis.zero_points is None:
        raise ValueError("the analysis measured both 4-bit grids: plan on analysis.on(zero_points)")
    chosen = {layer.name: START for layer in analysis.layers}
    moves = [
        (bound / max(saved, 1e-9), step, layer.name, precision, saved, added)
        for layer in analysis.layers
        for step, (precision, saved, added, bound) in enumerate(_moves(layer, analysis.zero_points))
    ]
    size = sum(weight_bytes(layer.params, layer.rows, START) for layer in analysis.layers)
    increase = 0.0
    taken: list[tuple[str, str]] = []
    blocked: set[str] = set()  # a layer whose move was refused takes none of its later ones
    for _, _, name, precision, saved, added in sorted(moves, key=lambda move: move[:2]):
        if size_budget is not None:
            if size <= size_budget:
                break
        elif name in blocked or max_increase is None or math.exp(increase + added) - 1.0 > max_increase:
            blocked.add(name)
            continue
        chosen[name] = precision
        taken.append((name, precision))
        size -= saved
        increase += added
    offered = {WIDE} | {p for layer in analysis.layers for p in (layer.losses or {NARROW: 0.0})}
    menu = "/".join(p for p in reversed(LINEAR) if p in offered)
    prediction = {
        "predicted_perplexity_ratio": math.exp(increase),
        "linear_bytes": size,
        #: linears at a 4-bit precision, and how many at each precision
        "narrow_layers": sum(1 for p in chosen.values() if p.startswith("w4g")),
        "precisions": {p: n for p in reversed(LINEAR) if (n := sum(1 for c in chosen.values() if c == p))},
        #: the moves taken, in the planner's order (the plan check backs off from the end): the layer,
        #: and the precision it moved to
        "order": [name for name, _ in taken],
        "steps": [precision for _, precision in taken],
        "rule": (
            f"linears from float down through {menu} until they fit {size_budget:,.0f} bytes"
            if size_budget is not None
            else f"linears from float down through {menu} while the predicted perplexity stays within "
            f"{1 + (max_increase or 0):.3f}x"
        ),
    }
    return LLMPlan(chosen, embedding, zero_points=analysis.zero_points), prediction


@dataclass
class PlanCheck:
    """The whole plan measured before lowering, and how far it was backed off."""

    tokens: int
    float_loss: float
    #: moves kept (a prefix of the planner's order) -> measured perplexity ratio
    measured: dict[int, float] = field(default_factory=dict)
    #: the same prefixes' next-token agreement with the float model (%), with a min_agreement
    agreement: dict[int, float] = field(default_factory=dict)
    min_agreement: float | None = None
    kept: int = 0
    planned: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "float_loss": self.float_loss,
            "measured": {str(k): v for k, v in sorted(self.measured.items())},
            "agreement": {str(k): v for k, v in sorted(self.agreement.items())},
            "min_agreement": self.min_agreement,
            "kept": self.kept,
            "planned": self.planned,
            "seconds": self.seconds,
        }


class _Swapper:
    """The HF model with any prefix of the planner's moves taken, the rest at START, the token table
    at the plan's precision: quantized modules are made once (GPTQ'd like the program's) and swapped
    in and out, so each measurement is one forward pass over the check text."""

    def __init__(self, model: Any, hessians: Hessians | None, embedding: str, zero_points: bool) -> None:
        from edgeq.llm.export import quantize_layers

        self.model, self.hessians, self.zero_points = model, hessians, zero_points
        self.names = {target: name for name, target in linear_modules(model).items()}
        self.made: dict[tuple[str, str], torch.nn.Module] = {}
        table = model.get_input_embeddings()
        self.table = table if embedding == "float" else quantize_layers(copy.deepcopy(table), LLMPlan({}, embedding))

    def module(self, target: str, precision: str) -> torch.nn.Module:
        key = (target, precision)
        if key not in self.made:
            original = self.model.get_submodule(self.names[target])
            self.made[key] = quantized_copy(original, target, precision, self.hessians, self.zero_points)
        return self.made[key]

    @contextlib.contextmanager
    def applied(self, precisions: dict[str, str]) -> Iterator[Any]:
        """The model with ``precisions`` (and the token table) swapped in, restored on exit."""
        table = self.model.get_input_embeddings()
        float_weight = table.weight
        originals: dict[str, torch.nn.Module] = {}
        try:
            table.weight = self.table.weight
            for target, precision in precisions.items():
                if precision != START:
                    originals[self.names[target]] = _swap(
                        self.model, self.names[target], self.module(target, precision)
                    )
            yield self.model
        finally:
            table.weight = float_weight
            for name, module in originals.items():
                _swap(self.model, name, module)

    def loss(
        self, precisions: dict[str, str], windows: list[list[int]], predictions: list[torch.Tensor] | None = None
    ) -> float:
        with self.applied(precisions) as model:
            return _loss(model, windows, predictions)


def measure_plan(model: Any, plan: LLMPlan, windows: list[list[int]], hessians: Hessians | None = None) -> float:
    """``plan``'s perplexity ratio against float on ``windows``: its linears and token table as the
    program will hold them, in the HF model."""
    swapper = _Swapper(model, hessians, plan.embedding, plan.zero_points)
    return math.exp(swapper.loss(plan.linears, windows) - _loss(model, windows))


def check_plan(
    model: Any,
    plan: LLMPlan,
    order: list[str],
    windows: list[list[int]],
    max_increase: float,
    steps: list[str],
    hessians: Hessians | None = None,
    min_agreement: float | None = None,
) -> tuple[LLMPlan, PlanCheck]:
    """Measure the whole plan on ``windows`` (training text the analysis did not read) and, when its
    perplexity ratio is above ``1 + max_increase`` (or, with ``min_agreement``, its next-token
    agreement with the float model below that many percent), keep the longest prefix of the
    planner's moves (``order``: each move's layer, cheapest first; ``steps``: the precision it moved
    to) that measures within both (bisection: the loss of a prefix grows with its length, its
    agreement falls); a layer's moves after the prefix are undone, back to its last kept precision
    (START when none). Per-layer increases do not add up exactly; this makes --max-drop (and
    --min-agreement) hold on the whole plan, as measured, not only as predicted."""
    start = time.perf_counter()
    if len(steps) != len(order):
        raise ValueError(f"{len(order)} moves but {len(steps)} steps")
    moves = list(zip(order, steps))
    reference: list[torch.Tensor] = []
    check = PlanCheck(sum(len(w) - 1 for w in windows), _loss(model, windows, reference), planned=len(order))
    check.min_agreement = min_agreement
    swapper = _Swapper(model, hessians, plan.embedding, plan.zero_points)
    planned = set(order)  # a layer the planner did not move (the user's --head) keeps its precision
    base = {name: (START if name in planned else precision) for name, precision in plan.linears.items()}
    expected = torch.cat(reference) if reference else torch.zeros(0, dtype=torch.long)

    def fits(k: int) -> bool:
        if k not in check.measured:
            precisions = {**base, **dict(moves[:k])}  # a layer's later move overrides its earlier one
            predictions: list[torch.Tensor] = []
            check.measured[k] = math.exp(swapper.loss(precisions, windows, predictions) - check.float_loss)
            same = (torch.cat(predictions) == expected).double().mean() if predictions else torch.tensor(1.0)
            check.agreement[k] = 100.0 * float(same)
        agrees = min_agreement is None or check.agreement[k] >= min_agreement
        return check.measured[k] <= 1.0 + max_increase and agrees

    if fits(len(order)):
        check.kept = len(order)
    else:
        low, high = 0, len(order)  # fits(high) is False; fits(low) is taken to (0: nothing narrowed)
        while high - low > 1:
            middle = (low + high) // 2
            if fits(middle):
                low = middle
            else:
                high = middle
        check.kept = low
    kept = {**base, **dict(moves[: check.kept])}
    check.seconds = time.perf_counter() - start
    return LLMPlan(kept, plan.embedding, zero_points=plan.zero_points), check
