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

#: adaptive: edgeq's voting tracker; ema: PT2E's moving-average observers in
#: torchao's FakeQuantize; ema-fused: PT2E's default as shipped
#: (FusedMovingAvgObsFakeQuantize), kept for comparison: measured here, its
#: fused kernel fake-quantizes per-channel 4-bit weights on a grid 0.94x the
#: one convert_pt2e emits, which cost 5 points of .pte accuracy on digits.
RANGE_MODES = ("adaptive", "ema", "ema-fused")


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


def _unfused(spec: Any) -> Any:
    """The same moving-average observer in torchao's unfused FakeQuantize, whose
    forward uses calculate_qparams(), the qparams convert_pt2e reads."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize

    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize

    partial = getattr(spec.observer_or_fake_quant_ctr, "p", None) if spec is not None else None
    if spec is None or spec.is_dynamic or getattr(partial, "func", None) is not FusedMovingAvgObsFakeQuantize:
        return spec
    return dataclasses.replace(spec, observer_or_fake_quant_ctr=FakeQuantize.with_args(**partial.keywords))


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
    return swap_fake_quants(config, qat, ranges)


def swap_fake_quants(config, qat: bool, ranges: RangeConfig):
    """Put the chosen QAT fake-quant into a backend's QuantizationConfig."""
    if not qat or ranges.mode == "ema-fused":
        return config
    swap = (lambda spec: _adaptive(spec, ranges.vote)) if ranges.mode == "adaptive" else _unfused
    return dataclasses.replace(
        config,
        input_activation=swap(config.input_activation),
        output_activation=swap(config.output_activation),
        weight=swap(config.weight),
    )


# Ops that fuse into the conv/linear before them and so belong to its layer.
_FOLLOWERS = ("batch_norm", "relu", "hardtanh", "clamp", "getitem")


def layer_owners(graph: torch.fx.GraphModule, layers: list[str]) -> dict[torch.fx.Node, str]:
    """Map each node to the planned layer it belongs to.

    A node belongs to the innermost planned module in its ``nn_module_stack``;
    a BatchNorm or activation without one inherits its input's layer, so a
    conv -> BN -> ReLU chain is planned as one unit, as XNNPACK fuses it.
    """
    wanted = set(layers)
    owners: dict[torch.fx.Node, str] = {}
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        stack = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
        names = [_clean(path) for path in stack]
        owned = [name for name in names if name in wanted]
        if owned:
            owners[node] = owned[-1]
        elif any(key in str(node.target) for key in _FOLLOWERS) and node.args:
            src = node.args[0]
            if isinstance(src, torch.fx.Node) and src in owners:
                owners[node] = owners[src]
    return owners


def _clean(path: str) -> str:
    # nn_module_stack paths look like "L['self'].features.0" or "features.0".
    path = path.replace("L['self'].", "").replace("L['self']", "")
    return path.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "").lstrip(".")


def _xnnpack_quantizer_class():
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    class PlanXNNPACKQuantizer(XNNPACKQuantizer):
        """XNNPACKQuantizer that assigns configs by planned layer, fused ops included.

        XNNPACK's own module-name filter needs every node of a pattern inside
        the named module, so a conv + ReLU pattern (the ReLU is a sibling
        module) would match neither the layer's config nor the global one.
        """

        def __init__(self, global_config, layer_configs: dict[str, object]) -> None:
            super().__init__()
            self.set_global(global_config)
            self.layer_configs = layer_configs

        def _annotate_for_quantization_config(self, model):
            owners = layer_owners(model, list(self.layer_configs))
            by_config: dict[int, tuple[object, set[str]]] = {}
            for layer, config in self.layer_configs.items():
                by_config.setdefault(id(config), (config, set()))[1].add(layer)
            # Weights and biases (get_attr nodes) follow the op that consumes them.
            for config, layers in by_config.values():
                self._annotate_all_patterns(
                    model, config, lambda n, ls=layers: n.op != "call_function" or owners.get(n) in ls)
            overridden = set(self.layer_configs)
            self._annotate_all_patterns(
                model, self.global_config, lambda n: n.op != "call_function" or owners.get(n) not in overridden)
            return model

    return PlanXNNPACKQuantizer


def build_quantizer(plan: Plan, target: Target, qat: bool = True, ranges: RangeConfig | None = None):
    """A PT2E quantizer configured layer by layer from ``plan``."""
    ranges = ranges or RangeConfig()
    if target.backend == "xnnpack":
        # The global config covers ops outside the planned layers (pooling,
        # adds, concatenations); layers that differ from it are overridden.
        default = target.default_precision
        configs: dict[str, object] = {}
        made: dict[str, object] = {}
        for entry in plan.layers:
            if entry.precision != default:
                if entry.precision not in made:
                    made[entry.precision] = xnnpack_config(target.precisions[entry.precision], qat, ranges)
                configs[entry.name] = made[entry.precision]
        return _xnnpack_quantizer_class()(xnnpack_config(target.precisions[default], qat, ranges), configs)
    if target.backend == "qnn":
        from .qnn import build_qnn_quantizer

        return build_qnn_quantizer(plan, target, qat, ranges)
    raise ValueError(f"unknown backend {target.backend}")


def adaptive_modules(model: torch.nn.Module) -> dict[str, AdaptiveRangeFakeQuantize]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptiveRangeFakeQuantize)}
