"""Activation smoothing for XNNPACK's 8-bit dynamic activations (AWQ-style, scales constant per group).

XNNPACK quantizes each linear's input per token to 8 bits at run time. A few input channels far louder
than the rest (the residual stream's outliers after an RMSNorm, SwiGLU's products before down_proj)
take most of each token's range and leave the other channels a handful of levels; on SmolLM2 that,
not the 4-bit weights, is where most of the lost next-token agreement goes. Dividing channel c of
the input by s_c and multiplying the weights' column c by s_c leaves the float function as it was
and moves the loudness into the weights. s is folded into what feeds the input (the RMSNorm's
weight; up_proj's rows before down_proj), so the program runs nothing extra.

As AWQ: s = a^alpha (a: each input channel's absolute maximum on training text), alpha searched per
input among :data:`ALPHAS` for the smallest error of the linears' outputs quantized as the plan says
(their 8-bit dynamic activations included), alpha 0 (no change) among them, so no input is smoothed
unless that measured better. Unlike AWQ, s is one number per run of :data:`GROUP` input channels: a
4-bit group's weights times one number are still on a grid of the same shape (with zero points,
exactly the grid they were on), so smoothing costs the 4-bit weights nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from edgeq.llm.export import FLOATS, LLMPlan
from edgeq.llm.plan import linear_modules, quantized_copy

__all__ = ["ALPHAS", "GROUP", "Smoothing", "smooth_activations"]

#: the exponents searched per input (0: the input left as it is)
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: input channels that share one scale: the 4-bit weight groups' size (w4g32), which the larger
#: groups (64, 128) are multiples of
GROUP = 32
#: every how-many-th token's input the search reads (the error is a mean; neighbours are alike)
_STRIDE = 4


@dataclass
class Smoothing:
    """What smoothing did: each smoothed input's alpha (by the first linear reading it, ExecuTorch
    names) and each linear's input scales (the linear now reads its old input divided by them)."""

    alphas: dict[str, float] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: the quantized outputs' relative squared error summed over the searched inputs, before and after
    error_before: float = 0.0
    error_after: float = 0.0
    tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": len(self.alphas),
            "smoothed": sum(1 for a in self.alphas.values() if a > 0),
            "alphas": dict(self.alphas),
            "error_before": self.error_before,
            "error_after": self.error_after,
            "tokens": self.tokens,
            "seconds": self.seconds,
        }


@dataclass
class _Input:
    """One input that several linears read, and where its scales fold: ``norm`` (a weight vector
    divided by s) or ``rows`` (a linear whose output rows are divided by s)."""

    source: torch.nn.Module
    fold: str
    readers: list[str]


def _inputs(model: Any) -> list[_Input]:
    """The inputs of a Llama-style decoder that a scale can fold into without a runtime op."""
    found = []
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        attention = [p + f"self_attn.{n}_proj" for n in "qkv"]
        found.append(_Input(layer.input_layernorm, "norm", attention))
        found.append(_Input(layer.post_attention_layernorm, "norm", [p + "mlp.gate_proj", p + "mlp.up_proj"]))
        found.append(_Input(layer.mlp.up_proj, "rows", [p + "mlp.down_proj"]))
    found.append(_Input(model.model.norm, "norm", ["lm_head"]))
    return found


def _untie_head(model: Any) -> None:
    """The head gets its own weight (the token table keeps the tied one): smoothing scales the head's columns."""
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is table.weight:
        head.weight = torch.nn.Parameter(table.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False


def _record_inputs(model: Any, windows: list[list[int]], names: list[str]) -> dict[str, torch.Tensor]:
    """Every ``_STRIDE``-th token's input to each named linear, in float32."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook(name: str):
        def record(module: torch.nn.Module, args: tuple) -> None:
            seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1])[::_STRIDE].float())

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            for window in windows:
                model(input_ids=torch.tensor([window]))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in seen.items()}


def _error(model: Any, x: torch.Tensor, references: dict[str, torch.Tensor], precisions: dict[str, str],
           scales: torch.Tensor, zero_points: bool) -> float:  # fmt: skip
    """The quantized readers' relative squared output error, against their float outputs ``references``,
    with their input divided by ``scales``."""
    total = 0.0
    for name, reference in references.items():
        linear = model.get_submodule(name)
        scaled = torch.nn.Linear(linear.in_features, linear.out_features, bias=False)
        scaled.weight = torch.nn.Parameter(linear.weight.detach() * scales, requires_grad=False)
        quantized = quantized_copy(scaled, "", precisions[name], None, zero_points)
        total += float(((quantized(x / scales) - reference) ** 2).sum() / (reference**2).sum().clamp(min=1e-30))
    return total


@torch.no_grad()
def _search(model: Any, x: torch.Tensor, readers: list[str], precisions: dict[str, str], zero_points: bool,
            ) -> tuple[float, torch.Tensor, float, float]:  # fmt: skip
    """(alpha, scales, error at alpha 0, error at alpha) for one input, the scales one per GROUP channels
    and of geometric mean 1 (so the weights' magnitude stays where it was)."""
    loudness = x.abs().amax(0).clamp(min=1e-5).view(-1, GROUP).amax(1)
    # the float outputs do not depend on alpha: computed once, not once per candidate
    references = {name: torch.nn.functional.linear(x, model.get_submodule(name).weight) for name in readers}
    best: tuple[float, torch.Tensor, float] | None = None
    unchanged = 0.0
    for alpha in ALPHAS:
        per_group = loudness.pow(alpha)
        per_group = per_group / per_group.log().mean().exp()
        scales = per_group.repeat_interleave(GROUP)
        error = _error(model, x, references, precisions, scales, zero_points)
        unchanged = error if alpha == 0 else unchanged
        if best is None or error < best[2]:
            best = (alpha, scales, error)
    assert best is not None
    return best[0], best[1], unchanged, best[2]


def _fold(source: Any, fold: str, readers: list[Any], scales: torch.Tensor) -> None:
    with torch.no_grad():
        for linear in readers:
            linear.weight.mul_(scales)
        if fold == "norm":
            source.weight.div_(scales)
        else:
            source.weight.div_(scales[:, None])
            if source.bias is not None:
                source.bias.div_(scales)


def smooth_activations(model: Any, windows: list[list[int]], plan: LLMPlan) -> Smoothing:
    """Smooth, in place, the inputs of ``model`` (a Llama-style Hugging Face decoder) whose readers
    ``plan`` quantizes, each with the alpha whose quantized outputs measured closest to float on
    ``windows`` (training text); a tied output head is untied first. Inputs whose width is not a
    multiple of GROUP, or read only by float linears, are left alone."""
    start = time.perf_counter()
    names = linear_modules(model)
    precisions = {hf: plan.linears.get(et, "float") for hf, et in names.items()}
    inputs = [
        found
        for found in _inputs(model)
        if any(precisions.get(name, "float") not in FLOATS for name in found.readers)
        and model.get_submodule(found.readers[0]).in_features % GROUP == 0
    ]
    result = Smoothing(tokens=sum(len(w) for w in windows))
    if not inputs:
        return result
    if any("lm_head" in found.readers for found in inputs):
        _untie_head(model)  # before any fold: a tied head's columns are the token table's
    recorded = _record_inputs(model, windows, [found.readers[0] for found in inputs])
    for found in inputs:
        readers = [name for name in found.readers if precisions[name] not in FLOATS]
        x = recorded.pop(found.readers[0])
        alpha, scales, before, after = _search(model, x, readers, precisions, plan.zero_points)
        result.alphas[names[found.readers[0]]] = alpha
        result.error_before += before
        result.error_after += after
        if alpha > 0:
            _fold(found.source, found.fold, [model.get_submodule(name) for name in found.readers], scales)
            for name in found.readers:
                result.scales[names[name]] = scales
    result.seconds = time.perf_counter() - start
    return result
