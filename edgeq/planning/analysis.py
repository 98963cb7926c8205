"""Per-layer range analysis (spec claims 7 and 9): what each layer's numbers look like.

For every quantizable layer (conv, linear) of the float model, on a few
calibration batches:

- weight range per output channel and the spread between channels;
- the range of the activation feeding the layer: min, max, 99.9 / 99.99
  percentiles of |x|, and an outlier ratio (max |x| over the 99.9 percentile);
- SQNR (dB) of the weights and of that activation at each precision the
  target offers;
- sensitivity: the change in task loss and metric when only that layer is
  quantized at each candidate precision.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgeq.errors import EdgeqError
from edgeq.planning.concats import ConcatAnalysis, analyze_concats
from edgeq.planning.plan import model_layers
from edgeq.quant.dynamic import fake_quant_per_token
from edgeq.recipe import Recipe, as_tuple
from edgeq.samples import join
from edgeq.targets import Precision, Target

#: activation samples kept per layer for percentiles
_SAMPLE = 200_000


@dataclass
class LayerAnalysis:
    name: str
    kind: str
    params: int
    weight_min: float
    weight_max: float
    weight_absmax: float
    #: largest channel absmax over the median channel absmax
    channel_spread: float
    channel_absmax: list[float]
    act_min: float
    act_max: float
    act_p999: float
    act_p9999: float
    #: max |x| over the 99.9th percentile of |x|
    outlier_ratio: float
    weight_sqnr: dict[str, float] = field(default_factory=dict)
    act_sqnr: dict[str, float] = field(default_factory=dict)
    #: precision -> increase of the task loss when only this layer is quantized
    loss_delta: dict[str, float] = field(default_factory=dict)
    #: precision -> drop of the task metric (points) when only this layer is quantized
    metric_drop: dict[str, float] = field(default_factory=dict)


@dataclass
class Analysis:
    target: str
    float_loss: float
    float_metric: float
    batches: int
    layers: list[LayerAnalysis]
    #: (training, evaluation) samples each sensitivity was scored on: fewer than the analysis
    #: batches hold when scoring every layer on all of them would overrun the FLOP budget
    sensitivity_samples: tuple[int, int] = (0, 0)
    #: whether the sensitivities were scored on every analysis batch (False: on a budgeted
    #: share, too noisy for the planner to send layers to float on their own)
    full_sensitivity: bool = True
    #: precisions not scored because they save no bytes over the target's default
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    #: output-tail concatenations whose inputs' ranges differ, measured (edgeq.planning.concats)
    concats: list[ConcatAnalysis] = field(default_factory=list)

    def layer(self, name: str) -> LayerAnalysis:
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _sqnr(x: torch.Tensor, q: torch.Tensor) -> float:
    noise = (x - q).double().pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(x.double().pow(2).mean() / noise))


def fake_quant_weight(w: torch.Tensor, bits: int, group: int = 0) -> torch.Tensor:
    """Per-output-channel (or per group of ``group`` input channels) symmetric fake-quantization,
    as the targets' quantizers do."""
    if group:
        from edgeq.quant.groupwise import GroupwiseFakeQuantize

        # The QAT fake-quant itself, calibrated on this weight: the grid that ships.
        with torch.no_grad():
            return GroupwiseFakeQuantize(group, bits)(w.detach().float().flatten(1)).reshape(w.shape)
    top = 2 ** (bits - 1) - 1
    absmax = w.detach().flatten(1).abs().amax(1).clamp(min=2**-12)
    scale = absmax / top
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.clamp(torch.round(w / scale.view(shape)), -top, top) * scale.view(shape)


def _by_output_channel(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``w`` with output channels first (its own inverse): a transposed conv's weight is [in, out, k...]."""
    return w.transpose(0, 1) if transposed and w.dim() > 1 else w


def fake_quant_act(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """Per-tensor affine fake-quantization over [lo, hi] (widened to contain 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    levels = 2**bits - 1
    scale = max((hi - lo) / levels, 2**-12)
    zero = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, levels) - zero) * scale


def _quantized_variants(target: Target, kind: str) -> dict[str, Precision]:
    return {name: p for name, p in target.precisions.items() if kind in p.ops and not p.is_float}


def _first(data, count: int, what: str) -> list:
    batches = []
    for batch in data:
        batches.append(batch)
        if len(batches) >= count:
            break
    if not batches:
        raise EdgeqError(f"{what}() yielded no batches", f"make the recipe's {what}() yield (inputs, target) batches")
    return batches


def _batches(recipe: Recipe, count: int) -> tuple[list, list]:
    """Calibration batches from train_data(), and the batches the metric is scored on: the same
    ones. Never the evaluation data: the plan is a decision. Not only the held-out slice either:
    the analysis fits nothing, so training batches measure a layer's sensitivity without bias, and
    there are ``count`` of them where the held-out slice has one or two (a photo in 32 is 3 points)."""
    train = _first(recipe.train_data(), count, "train_data")
    return train, train


def _score(model: nn.Module, recipe: Recipe, batches: tuple[list, list]) -> tuple[float, float]:
    """The task loss and the metric on the scoring batches (training batches, see :func:`_batches`);
    one forward pass when both are the same batches."""
    train, evaluation = batches
    losses, seen = [], 0
    outputs, targets = [], []
    with torch.no_grad():
        for inputs, target in train:
            out = recipe.score_output(model(*as_tuple(inputs)))
            losses.append(float(recipe.loss(out, target)) * len(out))
            seen += len(out)
            if evaluation is train:
                outputs.append(out)
                targets.append(target)
        for inputs, target in evaluation if evaluation is not train else ():
            outputs.append(recipe.score_output(model(*as_tuple(inputs))))
            targets.append(target)
    joined = join(targets, [len(o) for o in outputs])
    return sum(losses) / max(seen, 1), float(recipe.metric(torch.cat(outputs), joined))


def _samples(batches: list) -> int:
    return sum(len(as_tuple(inputs)[0]) for inputs, _ in batches)


def _share(batches: list, share: float) -> list:
    """About ``share`` of the samples in ``batches``: whole batches first, then the first rows of
    one batch (at least 8 samples), so a model with many layers still fits the FLOP budget."""
    sizes = [len(as_tuple(inputs)[0]) for inputs, _ in batches]
    want = max(8, int(sum(sizes) * share))
    kept: list = []
    total = 0
    for (inputs, target), size in zip(batches, sizes):
        if total + size > want:
            rows = want - total
            if not isinstance(target, (torch.Tensor, list, tuple)):
                kept.append((inputs, target))  # targets we cannot slice (a dict): the whole batch
            elif rows > 0 or not kept:
                rows = max(rows, 1)
                inputs = tuple(t[:rows] for t in as_tuple(inputs))
                kept.append((inputs if len(inputs) > 1 else inputs[0], target[:rows]))
            break
        kept.append((inputs, target))
        total += size
    return kept


def _scored_variants(target: Target, kind: str) -> tuple[dict[str, Precision], list[str]]:
    """The precisions worth a sensitivity score: the default, those that save bytes over it, and
    those as small as it with weights as wide but activations measured another way (dynamic int8
    beside static int8), which can only gain accuracy.

    A precision that costs as many bytes as the default with narrower weights (4-bit conv
    weights that XNNPACK holds in int8) can only lose accuracy, so the planner never picks it
    and scoring it would only cost time (on a 50-layer CNN, half the analysis).
    """
    variants = _quantized_variants(target, kind)
    default = target.precisions.get(target.default_precision)
    if default is None or kind not in default.ops:
        return variants, []
    keep = {
        name: p
        for name, p in variants.items()
        if name == target.default_precision
        or p.weight_bytes < default.weight_bytes
        or (
            p.weight_bytes == default.weight_bytes
            and p.weight_bits >= default.weight_bits
            and p.activations != default.activations
        )
    }
    return keep, sorted(set(variants) - set(keep))


def analyze(
    model: nn.Module,
    recipe: Recipe,
    target: Target,
    batches: int = 8,
    flops: float | None = None,
) -> Analysis:
    """Measure every quantizable layer of ``model`` on ``batches`` calibration batches.

    ``flops`` bounds the sensitivity scoring (one model evaluation per layer and precision):
    when scoring on all batches would cost more, each score uses a share of the samples (at
    least 8), and the analysis records how many. The task loss and the
    metric are scored on the calibration batches of train_data(), never on the evaluation data.
    """
    import time

    start = time.perf_counter()
    model = model.eval()
    data = _batches(recipe, batches)
    # Layers come from the exported graph: any module owning a conv, linear or weight-bearing
    # matmul. Its input range is read at the module's input (for a functional op inside a
    # custom module, that is the module's first input).
    graph_layers = [layer for layer in model_layers(model, recipe.example_inputs()) if layer.kind in target.kinds]
    inputs = _layer_inputs(model, graph_layers, data[0], batches)
    float_loss, float_metric, sensitivity = _sensitivity_batches(model, recipe, target, graph_layers, data, flops)
    skipped: dict[str, str] = {}
    floats = (float_loss, float_metric)
    results = [_layer_entry(model, layer, inputs[layer.name], recipe, target, sensitivity, floats, skipped)
               for layer in graph_layers]  # fmt: skip
    train, scoring = sensitivity
    concats = analyze_concats(model, recipe, train)
    return Analysis(
        target=target.name,
        float_loss=float_loss,
        float_metric=float_metric,
        batches=len(data[0]),
        layers=results,
        sensitivity_samples=(_samples(train), _samples(scoring)),
        full_sensitivity=_samples(train) == _samples(data[0]) and _samples(scoring) == _samples(data[1]),
        skipped=skipped,
        seconds=round(time.perf_counter() - start, 3),
        concats=concats,
    )


def _layer_inputs(model: nn.Module, layers: list, data: list, batches: int) -> dict[str, tuple[float, float, Tensor]]:
    """Each layer's input range (min, max) and a sample of its input values on the calibration batches."""
    modules = dict(model.named_modules())
    samples: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    extremes: dict[str, list[float]] = {layer.name: [math.inf, -math.inf] for layer in layers}

    def record(name):
        def hook(module, args):
            x = args[0].detach().float()
            if not bool(torch.isfinite(x).all()):
                raise EdgeqError(
                    f"calibration data reach layer '{name}' with NaN or inf values",
                    "check the recipe's train_data() and model() for NaN/inf values",
                )
            extremes[name][0] = min(extremes[name][0], float(x.min()))
            extremes[name][1] = max(extremes[name][1], float(x.max()))
            flat = x.flatten()
            if flat.numel() > _SAMPLE // batches:
                idx = torch.randint(0, flat.numel(), (_SAMPLE // batches,), generator=torch.Generator().manual_seed(0))
                flat = flat[idx]
            samples[name].append(flat)

        return hook

    handles = [modules[layer.name].register_forward_pre_hook(record(layer.name)) for layer in layers]
    try:
        # Ranges are calibration statistics: training batches only.
        with torch.no_grad():
            for inputs, _ in data:
                model(*as_tuple(inputs))
    finally:
        for handle in handles:
            handle.remove()
    return {name: (lo, hi, torch.cat(samples[name])) for name, (lo, hi) in extremes.items()}


def flops_per_sample(model: nn.Module, example_inputs: tuple) -> float:
    """The model's floating-point operations on one sample (torch's FlopCounterMode: convolutions,
    matmuls and attention; elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*example_inputs)
    return float(counter.get_total_flops()) / max(1, len(as_tuple(example_inputs)[0]))


def _sensitivity_batches(
    model: nn.Module, recipe: Recipe, target: Target, layers: list, data: tuple[list, list], flops: float | None
) -> tuple[float, float, tuple[list, list]]:
    """Float loss and metric, and the batches single-layer scores use: fewer when scoring every
    layer on all of them would spend more than ``flops``. The share depends on the model, the
    data and the budget only, so the same build plans the same on any machine at any load."""
    scores = sum(len(_scored_variants(target, layer.kind)[0]) for layer in layers)
    train, scoring = data
    if flops is not None and scores:
        per_sample = flops_per_sample(model, recipe.example_inputs())
        cost = scores * _samples(train) * per_sample
        if cost > flops:
            train = _share(train, flops / cost)
            scoring = train if data[1] is data[0] else _share(scoring, flops / cost)
    return (*_score(model, recipe, (train, scoring)), (train, scoring))


def _layer_entry(
    model: nn.Module,
    layer: Any,
    seen: tuple[float, float, Tensor],
    recipe: Recipe,
    target: Target,
    sensitivity: tuple[list, list],
    floats: tuple[float, float],
    skipped: dict[str, str],
) -> LayerAnalysis:
    """One layer's weights, input range and single-layer sensitivity at each scored precision."""
    name, kind, params = layer.name, layer.kind, layer.params
    weights = [model.get_parameter(w) for w in layer.weights]
    # per output channel, as the quantizers scale it: a transposed conv's are its weight's dim 1
    transposed = kind == "conv_transpose"
    w = _by_output_channel(weights[0].detach().float(), transposed)
    ch_absmax = w.flatten(1).abs().amax(1)
    lo, hi, acts = seen
    mags = acts.abs()
    p999 = float(torch.quantile(mags, 0.999)) if mags.numel() else 0.0
    p9999 = float(torch.quantile(mags, 0.9999)) if mags.numel() else 0.0
    lookup = kind == "embedding"  # weight-only, one scale per row; its input is token ids
    entry = LayerAnalysis(
        name=name,
        kind=kind,
        params=params,
        weight_min=float(w.min()),
        weight_max=float(w.max()),
        weight_absmax=float(ch_absmax.max()),
        channel_spread=1.0 if lookup else float(ch_absmax.max() / ch_absmax.median().clamp(min=1e-12)),
        channel_absmax=[round(float(v), 6) for v in ch_absmax],
        act_min=lo,
        act_max=hi,
        act_p999=p999,
        act_p9999=p9999,
        outlier_ratio=float(max(abs(lo), abs(hi)) / p999) if p999 > 0 and not lookup else 1.0,
    )
    variants, unscored = _scored_variants(target, kind)
    for pname in unscored:
        skipped[pname] = f"saves no bytes over {target.default_precision}"
    module = model.get_submodule(name)
    for pname, spec in variants.items():
        if spec.group_size and w.flatten(1).shape[1] % spec.group_size:
            continue  # its input channels do not split into groups: the planner cannot pick it
        entry.weight_sqnr[pname] = round(_sqnr(w, fake_quant_weight(w, spec.weight_bits, spec.group_size)), 3)
        if spec.activations == "static" and not lookup:
            entry.act_sqnr[pname] = round(_sqnr(acts, fake_quant_act(acts, lo, hi, spec.activation_bits)), 3)
        loss, metric = _layer_alone(model, module, weights, recipe, sensitivity, spec, (lo, hi), transposed)
        entry.loss_delta[pname] = round(loss - floats[0], 6)
        entry.metric_drop[pname] = round(floats[1] - metric, 4)
    return entry


def analyze_recipe(recipe=None, target="android", batches: int = 8) -> Analysis:
    """``edgeq.analyze``: load a recipe (path, module or Recipe; None: the bundled example)
    and a target (name, .toml path or Target), and analyze the recipe's float model."""
    from edgeq.backends import load_target
    from edgeq.recipe import load_recipe

    recipe = load_recipe(recipe)
    return analyze(recipe.model(), recipe, load_target(target), batches=batches)


def _layer_alone(
    model,
    module,
    weights: list[torch.nn.Parameter],
    recipe,
    data,
    spec: Precision,
    act_range: tuple[float, float],
    transposed: bool,
) -> tuple[float, float]:
    """Loss and metric with only ``module`` quantized (its weights, per output channel, and its input
    over ``act_range``); ``transposed``: a transposed conv, whose output channels are dim 1."""
    lo, hi = act_range
    originals = [weight.data.clone() for weight in weights]
    for weight, original in zip(weights, originals):
        quantized = fake_quant_weight(_by_output_channel(original, transposed), spec.weight_bits, spec.group_size)
        weight.data = _by_output_channel(quantized, transposed).contiguous()

    def quantize_input(mod, args):
        x = args[0]
        if not torch.is_floating_point(x):  # token ids into an embedding: weight-only
            return None
        if spec.activations == "dynamic":  # per token, as XNNPACK quantizes it (see quant.dynamic)
            return (fake_quant_per_token(x),) + tuple(args[1:])
        return (fake_quant_act(x, lo, hi, spec.activation_bits),) + tuple(args[1:])

    handle = module.register_forward_pre_hook(quantize_input)
    try:
        return _score(model, recipe, data)
    finally:
        handle.remove()
        for weight, original in zip(weights, originals):
            weight.data = original


def print_analysis(analysis: Analysis, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(
        title=f"edgeq analyze ({analysis.target}): float loss {analysis.float_loss:.4f}, "
        f"metric {analysis.float_metric:.2f}"
    )
    for col in (
        "layer",
        "kind",
        "weights",
        "w absmax",
        "spread",
        "input range",
        "p99.9",
        "outlier",
        "w SQNR dB",
        "Δloss",
    ):
        table.add_column(col, overflow="fold")
    for l in analysis.layers:
        table.add_row(
            l.name,
            l.kind,
            f"{l.params:,}",
            f"{l.weight_absmax:.3f}",
            f"{l.channel_spread:.1f}",
            f"[{l.act_min:.2f}, {l.act_max:.2f}]",
            f"{l.act_p999:.2f}",
            f"{l.outlier_ratio:.1f}",
            "\n".join(f"{k} {v:.1f}" for k, v in l.weight_sqnr.items()),
            "\n".join(f"{k} {v:+.4f}" for k, v in l.loss_delta.items()),
        )
    console.print(table)
