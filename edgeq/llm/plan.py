"""Per-layer precision for decoders: each linear scored by what 4 bits cost the next-token loss.

The analysis quantizes one linear at a time (a copy, with the very torchao
config the program will use, so activations are quantized dynamically as
XNNPACK runs them) and measures the mean next-token loss on windows of
the recipe's *training* text (never ``eval_text()``, which only reports). The
planner starts from 8-bit weights everywhere and moves to 4-bit groups the
linears whose loss increase per byte saved is smallest, while the summed
increase keeps the predicted perplexity within ``max_increase`` (a share:
0.05 is 5% above float) or until the program fits ``size_budget`` bytes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from edgeq.llm.convert import executorch_name
from edgeq.llm.export import LLMPlan

__all__ = ["LayerCost", "LLMAnalysis", "analyze_llm", "plan_llm", "weight_bytes"]

#: precisions the planner chooses between, narrowest last
WIDE, NARROW = "w8dyn", "w4g32"


def weight_bytes(params: int, rows: int, precision: str) -> float:
    """A linear's bytes in the program: integer weights and their float32 scales."""
    if precision == "float":
        return 4.0 * params
    if precision.startswith("w4g"):
        return 0.5 * params + 4.0 * params / int(precision[3:])
    return 1.0 * params + 4.0 * rows


@dataclass
class LayerCost:
    name: str
    params: int
    rows: int
    #: mean next-token loss increase (nats) with this linear alone at NARROW
    narrow_loss: float


@dataclass
class LLMAnalysis:
    float_loss: float
    tokens: int
    layers: list[LayerCost] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "float_loss": self.float_loss,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "narrow": NARROW,
            "layers": [vars(layer) for layer in self.layers],
        }


def _loss(model: Any, windows: list[list[int]]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window])
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(window) - 1
    return total / max(count, 1)


def analyze_llm(model: Any, windows: list[list[int]]) -> LLMAnalysis:
    """Each linear's loss increase at NARROW, one at a time, on ``windows`` (the training text)."""
    from edgeq.llm.export import quantize_layers

    start = time.perf_counter()
    base = _loss(model, windows)
    analysis = LLMAnalysis(base, sum(len(w) - 1 for w in windows))
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        target = executorch_name(name)
        if target is None:
            continue
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantized = quantize_layers(copy.deepcopy(module), LLMPlan({"": NARROW}, "float"))
        setattr(parent, attribute, quantized)
        try:
            loss = _loss(model, windows)
        finally:
            setattr(parent, attribute, module)
        weight = module.weight
        analysis.layers.append(LayerCost(target, weight.numel(), weight.shape[0], loss - base))
    analysis.seconds = time.perf_counter() - start
    return analysis


def plan_llm(
    analysis: LLMAnalysis, embedding: str, max_increase: float | None, size_budget: float | None
) -> tuple[LLMPlan, dict[str, Any]]:
    """The plan, and the planner's prediction: layers move WIDE -> NARROW, cheapest loss per byte
    saved first, within ``max_increase`` (predicted perplexity ratio - 1) or until the linears fit
    ``size_budget`` bytes."""
    chosen = {layer.name: WIDE for layer in analysis.layers}
    saved = {
        layer.name: weight_bytes(layer.params, layer.rows, WIDE) - weight_bytes(layer.params, layer.rows, NARROW)
        for layer in analysis.layers
    }
    size = sum(weight_bytes(layer.params, layer.rows, WIDE) for layer in analysis.layers)
    increase = 0.0
    order = sorted(analysis.layers, key=lambda layer: max(layer.narrow_loss, 0.0) / saved[layer.name])
    for layer in order:
        if size_budget is not None:
            if size <= size_budget:
                break
        elif max_increase is None or math.exp(increase + max(layer.narrow_loss, 0.0)) - 1.0 > max_increase:
            continue
        chosen[layer.name] = NARROW
        size -= saved[layer.name]
        increase += max(layer.narrow_loss, 0.0)
    prediction = {
        "predicted_perplexity_ratio": math.exp(increase),
        "linear_bytes": size,
        "narrow_layers": sum(1 for p in chosen.values() if p == NARROW),
        "rule": (
            f"linears to {NARROW} until they fit {size_budget:,.0f} bytes"
            if size_budget is not None
            else f"linears to {NARROW} while the predicted perplexity stays within {1 + (max_increase or 0):.3f}x"
        ),
    }
    return LLMPlan(chosen, embedding), prediction
