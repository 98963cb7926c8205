"""XNNPACK (Arm CPU) through ExecuTorch's XNNPACK delegate: the ``android`` target."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from edgeq import upstream
from edgeq.backends.base import AppRuntime, Backend
from edgeq.errors import EdgeqError
from edgeq.graph import layer_owners, sentinel_nodes
from edgeq.quant.configs import RangeConfig, swap_fake_quants, weight_range

if TYPE_CHECKING:
    from edgeq.planning.plan import Plan
    from edgeq.targets import Precision, Target

GRADLE_ARTIFACT = "org.pytorch:executorch-android"


def xnnpack_config(precision: Precision, qat: bool, ranges: RangeConfig) -> Any:
    """XNNPACK's symmetric config for one menu precision, with edgeq's QAT fake-quant."""
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
    if precision.group_size:
        # PT2E has no groupwise weight spec: edgeq quantizes these weights (edgeq.quant.groupwise).
        config = dataclasses.replace(config, weight=None)
    return swap_fake_quants(config, qat, ranges)


def _plan_quantizer_class() -> type:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    class PlanXNNPACKQuantizer(XNNPACKQuantizer):
        """XNNPACKQuantizer that assigns configs by planned layer, fused ops included.

        XNNPACK's own module-name filter needs every node of a pattern inside
        the named module, so a conv + ReLU pattern (the ReLU is a sibling
        module) would match neither the layer's config nor the global one.
        """

        def __init__(self, global_config: Any, layer_configs: dict[str, Any], float_ops: list[str]) -> None:
            super().__init__()
            self.set_global(global_config)
            #: layer -> config; None leaves the layer to another quantizer (or to float)
            self.layer_configs = layer_configs
            #: graph nodes the plan keeps in float (Plan.float_ops)
            self.float_ops = set(float_ops)

        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().transform_for_annotation(model)
            keep_integer_constants_integer(model)
            return model

        def _annotate_for_quantization_config(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            # Overrides XNNPACKQuantizer's private dispatch and calls its private
            # _annotate_all_patterns: the public set_module_name cannot express "this layer
            # and the ops fused into it" (see class docstring). tests/test_upstream.py pins both.
            with upstream.fuse_relu6(), upstream.cat_honours_filter():
                return self._annotate_by_layer(model)

        def _annotate_by_layer(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            owners = layer_owners(model, list(self.layer_configs))
            by_config: dict[int, tuple[Any, set[str]]] = {}
            for layer, config in self.layer_configs.items():
                if config is not None:
                    by_config.setdefault(id(config), (config, set()))[1].add(layer)
            # Weights and biases (get_attr nodes) follow the op that consumes them.
            for config, layers in by_config.values():
                self._annotate_all_patterns(model, config, _owned_by(owners, layers))
            overridden = set(self.layer_configs)
            floats = sentinel_nodes(model) | {n for n in model.graph.nodes if n.name in self.float_ops}
            self._annotate_all_patterns(
                model,
                self.global_config,
                lambda n: n.op != "call_function" or (owners.get(n) not in overridden and n not in floats),
            )
            # Concatenations stay quantized (one scale shared by their inputs) unless the plan keeps
            # them in float by name, also where ops between layers are float: XNNPACK takes
            # dequantize -> float cat -> quantize as a quantized concatenation and then refuses to
            # load a program whose inputs' scales differ (measured on FastestDet's SPP block).
            statics = [c for c, _ in by_config.values() if not c.input_activation.is_dynamic]
            cat_config = self.global_config or (statics[0] if statics else None)
            if cat_config is not None and not cat_config.input_activation.is_dynamic:
                self._annotate_all_patterns(
                    model,
                    cat_config,
                    lambda n: n.op != "call_function" or n not in floats,
                    torch.ops.aten.cat.default,
                )
            return model

    return PlanXNNPACKQuantizer


def keep_integer_constants_integer(model: torch.fx.GraphModule) -> int:
    """Give back integer dtypes to the scalar constants XNNPACKQuantizer made float32.

    XNNPACKQuantizer.transform_for_annotation turns every scalar operand of an
    add or mul into a float32 tensor constant, so that float adds can be
    annotated. On integer arithmetic (attention-mask code such as
    ``torch.arange(n) + offset`` feeding an index) that makes the result float
    and the index op fails at the first call. Where the op's own output is an
    integer tensor in the exported graph, the constant gets that dtype back;
    float arithmetic is untouched. Returns how many constants were changed.
    """
    changed = 0
    for node in model.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor):
            continue
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor) or out.dtype.is_floating_point or out.dtype.is_complex:
            continue
        for arg in node.args:
            if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and "_tensor_constant_" in str(arg.target)):
                continue
            value = model.get_buffer(str(arg.target))
            if value.dtype == out.dtype or not bool(value == value.round()):
                continue
            model.register_buffer(str(arg.target), value.to(out.dtype))
            fake = arg.meta.get("val")
            if fake is not None:
                arg.meta["val"] = fake.to(out.dtype)
            changed += 1
    if changed:
        model.recompile()
    return changed


def _owned_by(owners: dict[torch.fx.Node, str], layers: set[str]) -> Callable[[torch.fx.Node], bool]:
    return lambda n: n.op != "call_function" or owners.get(n) in layers


class XnnpackBackend(Backend):
    name = "xnnpack"
    title = "XNNPACK"
    plans_other_ops = True
    arm_cpu_runtime = True

    def check_target(self, data: dict[str, Any], precisions: dict[str, Precision], where: str) -> None:
        from edgeq.quant.groupwise import GROUP_MULTIPLE, RANGES

        for name, spec in precisions.items():
            if spec.group_size and (spec.group_size % GROUP_MULTIPLE or spec.weight_bits not in RANGES):
                raise EdgeqError(
                    f"{where}: precisions.{name} has group_size {spec.group_size} at {spec.weight_bits}-bit weights; "
                    f"XNNPACK runs groups of a multiple of {GROUP_MULTIPLE} input channels at 4 bits only",
                    f"use group_size = {GROUP_MULTIPLE}, 64 or 128 with weight_bits = 4",
                )

    def quantizer(self, plan: Plan, target: Target, qat: bool, ranges: RangeConfig) -> Any:
        """One quantizer for the static layers, and one before it for dynamically quantized ones.

        PT2E's convert cannot take dynamic and static specs from one
        XNNPACKQuantizer pass (the dynamic input's choose_qparams node is not
        found once a static spec has claimed the tensor), but it converts
        them from torchao's ComposableQuantizer with the dynamic quantizer
        first, as ExecuTorch's test_composable_quantizer_linear_conv does.
        The global config covers ops outside the planned layers (pooling,
        adds, concatenations); layers that differ from it are overridden.
        """
        default = target.precisions[target.default_precision]
        made: dict[str, Any] = {}

        def config(precision: str) -> Any:
            if precision not in made:
                made[precision] = xnnpack_config(target.precisions[precision], qat, ranges)
            return made[precision]

        # layer -> config per activation mode; None keeps a quantizer's global config off the layer
        by_mode: dict[bool, dict[str, Any]] = {False: {}, True: {}}
        between = plan.other_ops == "quantized"
        for entry in plan.layers:
            if entry.precision == default.name and between:
                continue
            is_dynamic = target.precisions[entry.precision].activations == "dynamic"
            by_mode[is_dynamic][entry.name] = config(entry.precision)
            by_mode[not is_dynamic][entry.name] = None
        default_dynamic = default.activations == "dynamic"
        cls = _plan_quantizer_class()
        global_config = config(default.name) if between else None
        static = cls(None if default_dynamic else global_config, by_mode[False], plan.float_ops)
        dynamic = cls(global_config if default_dynamic else None, by_mode[True], plan.float_ops)
        if not any(by_mode[False].values()) and (default_dynamic or not between):
            return dynamic
        if not any(by_mode[True].values()) and (not default_dynamic or not between):
            return static
        from torchao.quantization.pt2e.quantizer import ComposableQuantizer

        return ComposableQuantizer([dynamic, static])

    def partitioners(self, target: Target, allow_download: bool = False) -> list[Any]:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return [XnnpackPartitioner()]

    def float_partitioners(self) -> list[Any]:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return [XnnpackPartitioner()]

    def per_op_partitioners(self, target: Target) -> list[Any] | None:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return [XnnpackPartitioner(per_op_mode=True)]

    def app_runtime(self, manifest: dict[str, Any]) -> AppRuntime:
        version = manifest["versions"]["executorch"]
        return AppRuntime(
            gradle=(f"{GRADLE_ARTIFACT}:{version}",),
            note=(
                f"ExecuTorch Android runtime matching the exporter (executorch {version}); XNNPACK is built in, "
                "and so (per ExecuTorch's Android documentation) are its portable and quantized kernels, which run "
                "what stays outside the delegate, quantized embedding lookups included."
            ),
        )
