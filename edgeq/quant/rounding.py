"""Weight scales and weight rounding of a converted reference, fitted layer by layer to the float layer.

Round-to-nearest with the observer's max-abs scale is what PTQ gives each
weight. Neither is what minimizes the error a layer's *output* carries, which
is what the network feels:

1. **Scale search** (per output channel): each channel's scale is the one,
   among clipping ratios of its max-abs scale, whose quantized weights give the
   smallest squared error of that channel's output on calibration inputs
   (sequential MSE, as AIMET's SeqMSE and Qualcomm's QNN tools do it). Output
   channels of a conv/linear do not interact, so every channel picks its own
   ratio from one pass per ratio.
2. **Adaptive rounding** (AdaRound, Nagel et al., "Up or Down? Adaptive
   Rounding for Post-Training Quantization", ICML 2020): each weight rounds up
   or down, as a learned soft choice (a rectified sigmoid) that a regularizer
   anneals to 0 or 1, fitted to the float layer's output.

Both run on the converted graph (integer weights behind ``dequantize_per_channel``),
layer by layer in graph order; each layer sees its input as the quantized
network computes it, with every layer upstream already fitted, so later layers
also absorb upstream error. The integer weights and scales are rewritten in
place: lowering reads them as they are, so the program runs exactly this.

A layer whose bias the quantizer quantized itself (QNN's int32 biases, on the
grid of input scale x weight scale) keeps its scales: a new weight scale
would leave its bias on the wrong grid. Its rounding is still fitted.
"""

from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass, field

import torch
from torch import fx

from edgeq.quant.bias_correction import correctable

__all__ = ["RoundingConfig", "RoundingResult", "fit_rounding"]

_WEIGHTED = ("aten.conv1d.", "aten.conv2d.", "aten.linear.")
_DQ_CHANNEL = "quantized_decomposed.dequantize_per_channel"


@dataclass(frozen=True)
class RoundingConfig:
    #: clipping ratios of each channel's max-abs scale the scale search tries (1.0: PTQ's own)
    ratios: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
    #: AdaRound optimizer steps per layer (0: scale search only)
    iterations: int = 200
    #: samples per AdaRound step, drawn from the calibration samples
    batch: int = 8
    learning_rate: float = 1e-2
    #: weight of the regularizer that pushes each soft rounding to 0 or 1
    regularization: float = 0.01
    #: share of the steps before the regularizer starts (the soft choice moves freely first)
    warmup: float = 0.2
    seed: int = 0


@dataclass
class RoundingResult:
    #: layer -> output MSE before and after, share of weights whose rounding changed, channels rescaled
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0

    @property
    def improved(self) -> bool:
        return any(row["after"] < row["before"] for row in self.layers.values())


@dataclass
class _Weight:
    """A layer's integer weights and their per-channel grid, as the converted graph holds them."""

    integers: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int

    def shape(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(-1, *([1] * (self.integers.dim() - 1)))

    def dequantized(self, integers: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
        q = (self.integers if integers is None else integers).float()
        s = self.shape(self.scale if scale is None else scale)
        return (q - self.shape(self.zero_point).float()) * s

    def rounded(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        zp = self.shape(self.zero_point).float()
        return torch.clamp(torch.round(weight / self.shape(scale)) + zp, self.qmin, self.qmax)


def _attr(graph: fx.GraphModule, node: object) -> torch.Tensor | None:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    value = operator.attrgetter(str(node.target))(graph)
    return value if isinstance(value, torch.Tensor) else None


def _weight_of(graph: fx.GraphModule, node: fx.Node) -> _Weight | None:
    """The per-channel (output axis) integer weight of a conv/linear node, or None."""
    dq = node.args[1] if len(node.args) > 1 else None
    if not (isinstance(dq, fx.Node) and _DQ_CHANNEL in str(dq.target)):
        return None
    integers, scale, zero_point = (_attr(graph, a) for a in dq.args[:3])
    axis, qmin, qmax = dq.args[3:6]
    if integers is None or scale is None or zero_point is None or axis != 0:
        return None
    assert isinstance(qmin, int) and isinstance(qmax, int)
    return _Weight(integers, scale, zero_point, qmin, qmax)


def _layers(graph: fx.GraphModule) -> dict[str, fx.Node]:
    return {
        n.name: n
        for n in graph.graph.nodes
        if n.op == "call_function" and str(n.target).startswith(_WEIGHTED) and _weight_of(graph, n) is not None
    }


class _FloatWeights(fx.Interpreter):
    """Each conv/linear's weight as the float graph computes it (BatchNorm folded as captured)."""

    def __init__(self, module: fx.GraphModule, names: set[str]) -> None:
        super().__init__(module)
        self.names = names
        self.weights: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        if n.name in self.names:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.weights[n.name] = args[1].detach().float().clone()
        return super().run_node(n)


def _channel_errors(out: torch.Tensor, target: torch.Tensor, linear: bool) -> torch.Tensor:
    diff = (out - target).float() ** 2
    axis = -1 if linear else 1
    return diff.movedim(axis, 0).reshape(diff.shape[axis], -1).sum(1)


class _Fit(fx.Interpreter):
    def __init__(
        self,
        module: fx.GraphModule,
        layers: dict[str, fx.Node],
        floats: dict[str, torch.Tensor],
        config: RoundingConfig,
    ) -> None:
        super().__init__(module)
        self.layers = layers
        self.floats = floats
        self.config = config
        self.result = RoundingResult()
        self.generator = torch.Generator().manual_seed(config.seed)

    def run_node(self, n: fx.Node):
        if n.name not in self.layers or n.name not in self.floats:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        # The reference's parameters (float biases) require grad: nothing fitted here is trained
        # through them, and an input carrying their graph could not be backpropagated twice.
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        weight = _weight_of(self.module, n)  # type: ignore[arg-type]
        assert weight is not None

        def layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return n.target(x, w, *args[2:], **kwargs)  # type: ignore[operator]

        with torch.no_grad():
            target = layer(args[0], self.floats[n.name])
        row = self._fit(n, weight, args[0], target, layer)
        self.result.layers[n.name] = row
        with torch.no_grad():
            return layer(args[0], weight.dequantized())

    def _fit(self, n: fx.Node, weight: _Weight, x: torch.Tensor, target: torch.Tensor, layer) -> dict[str, float]:
        linear = str(n.target).startswith("aten.linear.")
        before_integers = weight.integers.clone()
        with torch.no_grad():
            before = float(_channel_errors(layer(x, weight.dequantized()), target, linear).sum()) / target.numel()
        rescaled = 0
        if correctable(n) and len(self.config.ratios) > 1:
            rescaled = self._search_scales(weight, self.floats[n.name], x, target, layer, linear)
        if self.config.iterations:
            self._adaround(weight, self.floats[n.name], x, target, layer)
        with torch.no_grad():
            after = float(_channel_errors(layer(x, weight.dequantized()), target, linear).sum()) / target.numel()
        if after > before:  # a fit that made this layer worse on its own data is undone
            weight.integers.copy_(before_integers)
            after = before
        changed = float((weight.integers != before_integers).float().mean())
        return {"before": before, "after": after, "changed": changed, "rescaled_channels": float(rescaled)}

    @torch.no_grad()
    def _search_scales(self, weight: _Weight, w: torch.Tensor, x: torch.Tensor, target, layer, linear: bool) -> int:
        base = weight.scale.clone()
        best_error = best_scale = None
        for ratio in self.config.ratios:
            scale = base * ratio
            errors = _channel_errors(layer(x, weight.dequantized(weight.rounded(w, scale), scale)), target, linear)
            if best_error is None or best_scale is None:
                best_error, best_scale = errors, scale.clone()
                continue
            better = errors < best_error
            best_error = torch.where(better, errors, best_error)
            best_scale = torch.where(better, scale, best_scale)
        assert best_scale is not None
        weight.scale.copy_(best_scale.to(weight.scale.dtype))
        weight.integers.copy_(weight.rounded(w, weight.scale).to(weight.integers.dtype))
        return int((best_scale != base).sum())

    def _adaround(self, weight: _Weight, w: torch.Tensor, x: torch.Tensor, target: torch.Tensor, layer) -> None:
        scale = weight.shape(weight.scale).float()
        zp = weight.shape(weight.zero_point).float()
        scaled = w / scale
        floor = torch.floor(scaled)
        rest = (scaled - floor).clamp(0.01, 0.99)
        zeta, gamma = 1.1, -0.1
        # The soft rounding starts where round-to-nearest's fraction is (Nagel et al., section 4).
        v = (-torch.log((zeta - gamma) / (rest - gamma) - 1)).requires_grad_(True)
        with torch.enable_grad():
            self._descend(v, floor, scale, zp, weight, x, target, layer)
        with torch.no_grad():
            up = (torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0, 1) >= 0.5).float()
            weight.integers.copy_(torch.clamp(floor + up + zp, weight.qmin, weight.qmax).to(weight.integers.dtype))

    def _descend(self, v, floor, scale, zp, weight: _Weight, x, target, layer) -> None:
        config = self.config
        zeta, gamma = 1.1, -0.1
        optimizer = torch.optim.Adam([v], lr=config.learning_rate)
        samples = x.shape[0]
        warm = int(config.warmup * config.iterations)
        for step in range(config.iterations):
            pick = torch.randint(0, samples, (min(config.batch, samples),), generator=self.generator)
            soft = torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0, 1)
            integers = torch.clamp(floor + soft + zp, weight.qmin, weight.qmax)
            out = layer(x[pick], (integers - zp) * scale)
            loss = (out - target[pick]).pow(2).sum(1 if out.dim() > 2 else -1).mean()
            if step >= warm:
                # beta anneals 20 -> 2: early, only choices far from 0.5 are pushed to an end
                progress = (step - warm) / max(1, config.iterations - warm)
                beta = 2 + 18 * 0.5 * (1 + math.cos(math.pi * progress))
                loss = loss + config.regularization * (1 - (2 * soft - 1).abs().pow(beta)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@torch.no_grad()
def _float_weights(float_graph: fx.GraphModule, names: set[str], example: tuple) -> dict[str, torch.Tensor]:
    reader = _FloatWeights(float_graph, names)
    reader.run(*example)
    return reader.weights


def fit_rounding(
    reference: fx.GraphModule,
    float_graph: fx.GraphModule,
    inputs: tuple[torch.Tensor, ...],
    config: RoundingConfig | None = None,
) -> RoundingResult:
    """Fit ``reference``'s per-channel weight scales and rounding to ``float_graph``, in place.

    ``float_graph`` is the float model captured as the reference was (same node names, BatchNorm
    folded the same way); ``inputs`` one batch of calibration samples (training data only).
    """
    config = config or RoundingConfig()
    start = time.perf_counter()
    layers = _layers(reference)
    floats = _float_weights(float_graph, set(layers), tuple(t[:1] for t in inputs))
    fit = _Fit(reference, layers, floats, config)
    with torch.no_grad():  # AdaRound turns gradients on for its own variables only
        fit.run(*inputs)
    reference.recompile()
    result = fit.result
    result.samples = int(inputs[0].shape[0]) if inputs else 0
    result.seconds = time.perf_counter() - start
    return result
