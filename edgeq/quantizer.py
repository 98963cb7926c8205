"""Turn a precision plan into a PT2E quantizer for the target's backend.

Static activation and weight specs get edgeq's adaptive-range fake-quant for
QAT (``ranges="adaptive"``) or PT2E's moving-average default (``"ema"``),
or plain observers for post-training quantization (``qat=False``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .fake_quant import AdaptiveRangeFakeQuantize
from .plan import Plan
from .ranges import VoteConfig
from .targets import Precision, Target

RANGE_MODES = ("adaptive", "ema")


@dataclass(frozen=True)
class RangeConfig:
    """Which fake-quant QAT uses, and the adaptive tracker's knobs."""

    mode: str = "adaptive"
    vote: VoteConfig = field(default_factory=VoteConfig)

    def __post_init__(self) -> None:
        if self.mode not in RANGE_MODES:
            raise ValueError(f"ranges must be one of {RANGE_MODES}, got {self.mode!r}")


def _adaptive(spec: Any, vote: VoteConfig) -> Any:
    if spec is None or spec.is_dynamic:
        return spec
    ctr = AdaptiveRangeFakeQuantize.with_args(
        eps=2**-12,
        up_ratio=vote.up_ratio,
        down_ratio=vote.down_ratio,
        min_votes=vote.min_votes,
        window=vote.window,
        rule=vote.rule,
        keep=vote.keep,
        step=vote.step,
    )
    return dataclasses.replace(spec, observer_or_fake_quant_ctr=ctr)


def weight_range(bits: int) -> tuple[int, int]:
    """Symmetric signed range for a weight width, e.g. 4 -> (-7, 7)."""
    top = 2 ** (bits - 1) - 1
    return -top, top


def xnnpack_config(precision: Precision, qat: bool, ranges: RangeConfig):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    if precision.is_float:
        return None
    dynamic = precision.activations == "dynamic"
    wmin, wmax = weight_range(precision.weight_bits)
    if dynamic and precision.weight_bits == 4:
        # XNNPACK packs 4-bit linear weights (qc4w) only from the full [-8, 7] range.
        wmin = -8
    config = get_symmetric_quantization_config(
        is_per_channel=True, is_qat=qat, is_dynamic=dynamic, weight_qmin=wmin, weight_qmax=wmax
    )
    if qat and ranges.mode == "adaptive":
        config = dataclasses.replace(
            config,
            input_activation=_adaptive(config.input_activation, ranges.vote),
            output_activation=_adaptive(config.output_activation, ranges.vote),
            weight=_adaptive(config.weight, ranges.vote),
        )
    return config


def build_quantizer(plan: Plan, target: Target, qat: bool = True, ranges: RangeConfig | None = None):
    """A PT2E quantizer configured layer by layer from ``plan``."""
    ranges = ranges or RangeConfig()
    if target.backend == "xnnpack":
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

        # The global config covers ops outside the planned layers (pooling,
        # adds, concatenations); layers that differ from it are overridden by name.
        default = target.default_precision
        quantizer = XNNPACKQuantizer().set_global(xnnpack_config(target.precisions[default], qat, ranges))
        for entry in plan.layers:
            if entry.precision != default:
                quantizer.set_module_name(entry.name, xnnpack_config(target.precisions[entry.precision], qat, ranges))
        return quantizer
    if target.backend == "qnn":
        from .qnn import build_qnn_quantizer

        return build_qnn_quantizer(plan, target, qat, ranges)
    raise ValueError(f"unknown backend {target.backend}")


def adaptive_modules(model: torch.nn.Module) -> dict[str, AdaptiveRangeFakeQuantize]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptiveRangeFakeQuantize)}
