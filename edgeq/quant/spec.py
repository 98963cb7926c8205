"""What prepare and convert are told to do: a typed quantization spec.

A backend's PT2E quantizer annotates the ops its delegate runs; the layers
edgeq quantizes by itself, whatever the backend (groupwise weights, float16
layers, embedding tables), travel beside it here rather than as attributes on
the third-party quantizer object.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from edgeq.configs import RangeConfig
from edgeq.errors import EdgeqError
from edgeq.planning.plan import Plan
from edgeq.targets import Target

__all__ = ["QuantSpec", "edgeq_layers", "quant_spec"]


@dataclass(frozen=True)
class QuantSpec:
    #: the backend's PT2E quantizer (a torchao ``Quantizer``) for the planned layers
    quantizer: Any
    #: fake-quantize for training (True) or observe for calibration (False)
    qat: bool = True
    ranges: RangeConfig = field(default_factory=RangeConfig)
    #: layer -> (group size, weight bits): weights quantized in groups (edgeq.quant.groupwise)
    groupwise: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    #: layers run in float16 (edgeq.quant.half)
    half: frozenset[str] = frozenset()
    #: embedding layer -> row bits (edgeq.quant.embeddings)
    tables: Mapping[str, int] = field(default_factory=dict)
    #: the backend's rewrite of the captured graph before quantization (Backend.rewrite_for_quantization)
    rewrite: Callable[[torch.fx.GraphModule], int] | None = None


def edgeq_layers(plan: Plan, target: Target) -> dict[str, Any]:
    """The plan's layers that edgeq quantizes itself, as QuantSpec fields."""
    precision = {entry.name: target.precisions[entry.precision] for entry in plan.layers}
    kind = {entry.name: entry.kind for entry in plan.layers}
    return {
        "groupwise": {name: (p.group_size, p.weight_bits) for name, p in precision.items() if p.group_size},
        "half": frozenset(name for name, p in precision.items() if p.half),
        "tables": {
            name: p.weight_bits for name, p in precision.items() if kind[name] == "embedding" and not p.is_float
        },
    }


def quant_spec(plan: Plan, target: Target, qat: bool = True, ranges: RangeConfig | None = None) -> QuantSpec:
    """What prepare/convert quantize: the target's backend quantizer for ``plan``, and the layers edgeq
    quantizes itself whatever the backend (edgeq.quant.embeddings, .groupwise, .half).

    ``target`` must be resolved (``edgeq.load_target``): it carries its backend.
    """
    if target.impl is None:
        raise EdgeqError(
            f"target '{target.name}' was parsed but not resolved", "load it with edgeq.load_target (or resolve_target)"
        )
    ranges = ranges or RangeConfig()
    quantizer = target.impl.quantizer(plan, target, qat, ranges)
    return QuantSpec(
        quantizer=quantizer,
        qat=qat,
        ranges=ranges,
        rewrite=target.impl.rewrite_for_quantization,
        **edgeq_layers(plan, target),
    )
