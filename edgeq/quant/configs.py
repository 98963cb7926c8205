"""Backend-independent quantization configs: which fake-quant QAT uses.

Static activation and weight specs get edgeq's adaptive-range fake-quant for
QAT (``ranges="adaptive"``) or PT2E's moving-average default (``"ema"``),
or plain observers for post-training quantization (``qat=False``); dynamic
inputs get the per-token fake-quant of :mod:`edgeq.quant.dynamic`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from edgeq.configs import RangeConfig
from edgeq.quant.dynamic import PerTokenFakeQuantize
from edgeq.quant.fake_quant import AdaptiveRangeFakeQuantize, vote_kwargs
from edgeq.quant.ranges import VoteConfig


def _adaptive(spec: Any, vote: VoteConfig) -> Any:
    if spec is None or spec.is_dynamic:
        return spec
    ctr = AdaptiveRangeFakeQuantize.with_args(eps=2**-12, **vote_kwargs(vote))
    return dataclasses.replace(spec, observer_or_fake_quant_ctr=ctr)


def _unfused(spec: Any) -> Any:
    """The same moving-average observer in torchao's unfused FakeQuantize, whose
    forward uses calculate_qparams(), the qparams convert_pt2e reads."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize, FusedMovingAvgObsFakeQuantize

    partial = getattr(spec.observer_or_fake_quant_ctr, "p", None) if spec is not None else None
    if spec is None or spec.is_dynamic or getattr(partial, "func", None) is not FusedMovingAvgObsFakeQuantize:
        return spec
    return dataclasses.replace(spec, observer_or_fake_quant_ctr=FakeQuantize.with_args(**partial.keywords))  # type: ignore[union-attr]


def weight_range(bits: int) -> tuple[int, int]:
    """Symmetric signed range for a weight width, e.g. 4 -> (-7, 7)."""
    top = 2 ** (bits - 1) - 1
    return -top, top


def _per_token(spec: Any) -> Any:
    if spec is None or not spec.is_dynamic:
        return spec
    return dataclasses.replace(spec, observer_or_fake_quant_ctr=PerTokenFakeQuantize.with_args(eps=2**-12))


def swap_fake_quants(config: Any, qat: bool, ranges: RangeConfig) -> Any:
    """Put the chosen QAT fake-quant into a backend's QuantizationConfig.

    Dynamic inputs get the program's per-token grid whatever the range method (they have no
    range to track); ``ema-fused`` stays PT2E's default as shipped, per-tensor dynamic inputs
    included."""
    if not qat or ranges.mode == "ema-fused":
        return config
    config = dataclasses.replace(config, input_activation=_per_token(config.input_activation))
    swap = (lambda spec: _adaptive(spec, ranges.vote)) if ranges.mode == "adaptive" else _unfused
    return dataclasses.replace(
        config,
        input_activation=swap(config.input_activation),
        output_activation=swap(config.output_activation),
        weight=swap(config.weight),
    )


def adaptive_modules(model: torch.nn.Module) -> dict[str, AdaptiveRangeFakeQuantize]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptiveRangeFakeQuantize)}
