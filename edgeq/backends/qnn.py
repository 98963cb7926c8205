"""Qualcomm HTP (NPU) through ExecuTorch's QNN backend.

Quantizing (``QnnQuantizer``) needs only the Python package; lowering needs
the QNN libraries. ExecuTorch's Qualcomm code can download an SDK when
``QNN_SDK_ROOT`` is unset, so edgeq imports it lazily, only for a Qualcomm
target, and only lets it download when the user opts in
(``--allow-sdk-download``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from edgeq import upstream
from edgeq.backends.base import AppRuntime, Backend
from edgeq.errors import EdgeqError, SdkMissingError
from edgeq.graph import layer_owners
from edgeq.quant.configs import RangeConfig, swap_fake_quants

if TYPE_CHECKING:
    from edgeq.planning.plan import Plan
    from edgeq.targets import Precision, Target

SDK_HELP = upstream.QNN_SDK_HELP


def sdk_available() -> bool:
    root = os.environ.get("QNN_SDK_ROOT")
    return bool(root) and os.path.isdir(str(root))


def ensure_sdk(allow_download: bool = False) -> None:
    """Make the SDK usable, or refuse in one line; never downloads unless allowed."""
    if sdk_available():
        return
    if not allow_download:
        raise SdkMissingError(
            "the Qualcomm AI Engine Direct SDK is needed to write model.pte for QNN HTP (QNN_SDK_ROOT is not set)",
            SDK_HELP,
        )
    upstream.allow_qnn_sdk_download()()


def _quant_dtype(name: str) -> Any:
    from executorch.backends.qualcomm.quantizer.quantizer import QuantDtype

    return QuantDtype[name]


def _adapt(module_qconfig: Any, ranges: RangeConfig) -> Any:
    """Put edgeq's chosen QAT fake-quant into a ModuleQConfig's configs."""
    module_qconfig.quant_config = swap_fake_quants(module_qconfig.quant_config, True, ranges)
    module_qconfig.per_channel_quant_config_list = [
        swap_fake_quants(c, True, ranges) for c in module_qconfig.per_channel_quant_config_list
    ]
    return module_qconfig


def _owned_by(owner: Callable[[torch.fx.Node], str | None], name: str) -> Callable[[torch.fx.Node], bool]:
    return lambda node: owner(node) == name


class QnnBackend(Backend):
    name = "qnn"
    title = "Qualcomm QNN (HTP)"

    def check_target(self, data: dict[str, Any], precisions: dict[str, Precision], where: str) -> None:
        chipset = data.get("chipset")
        if not isinstance(chipset, str) or not chipset:
            raise EdgeqError(f"{where}: missing field 'chipset'", 'name the QcomChipset, e.g. chipset = "SM8650"')
        missing = [p for p, spec in precisions.items() if not spec.is_float and not spec.backend_dtype]
        if missing:
            raise EdgeqError(
                f"{where}: precisions {', '.join(missing)} lack 'backend_dtype'",
                "name the QnnQuantizer QuantDtype (e.g. use_8a8w) for each",
            )

    def quantizer(self, plan: Plan, target: Target, qat: bool, ranges: RangeConfig) -> Any:
        upstream.forbid_qnn_sdk_download()
        from executorch.backends.qualcomm.quantizer.quantizer import ModuleQConfig, QnnQuantizer

        def module_qconfig(precision: str) -> Any:
            spec = target.precisions[precision]
            mq = ModuleQConfig(
                quant_dtype=_quant_dtype(spec.backend_dtype),
                is_qat=qat,
                is_conv_per_channel=True,
                is_linear_per_channel=True,
            )
            return _adapt(mq, ranges) if qat else mq

        quantizer = QnnQuantizer()
        quantizer.default_quant_config = module_qconfig(target.default_precision)
        owners_by_graph: dict[int, dict[torch.fx.Node, str]] = {}
        layers = [entry.name for entry in plan.layers]

        def owner(node: torch.fx.Node) -> str | None:
            graph = node.graph
            if id(graph) not in owners_by_graph:
                owners_by_graph[id(graph)] = layer_owners(graph.owning_module, layers)  # type: ignore[arg-type]
            return owners_by_graph[id(graph)].get(node)

        made: dict[str, Any] = {}
        rules: list[tuple[Callable[[torch.fx.Node], bool], Any]] = []
        for entry in plan.layers:
            if entry.precision == target.default_precision:
                continue
            if entry.precision not in made:
                made[entry.precision] = module_qconfig(entry.precision)
            rules.append((_owned_by(owner, entry.name), made[entry.precision]))
        quantizer.set_submodule_qconfig_list(rules)
        return quantizer

    def ensure_sdk(self, allow_download: bool = False) -> None:
        ensure_sdk(allow_download)

    def partitioners(self, target: Target, allow_download: bool = False) -> list[Any]:
        ensure_sdk(allow_download)
        from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
        from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
        from executorch.backends.qualcomm.utils.utils import (
            generate_htp_compiler_spec,
            generate_qnn_executorch_compiler_spec,
        )

        backend_options = generate_htp_compiler_spec(use_fp16=False)
        specs = generate_qnn_executorch_compiler_spec(
            soc_model=getattr(QcomChipset, target.chipset), backend_options=backend_options
        )
        return [QnnPartitioner(specs)]

    def app_runtime(self, manifest: dict[str, Any]) -> AppRuntime:
        version = manifest["versions"]["executorch"]
        return AppRuntime(
            gradle=(f"org.pytorch:executorch-android-qnn:{version}",),
            note=(
                f"ExecuTorch Android runtime with the QNN backend (executorch {version}); the app also "
                "packages Qualcomm's QNN HTP libraries for the phone's Hexagon version."
            ),
        )
