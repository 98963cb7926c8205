"""Qualcomm HTP through ExecuTorch's QNN backend.

Quantizing (``QnnQuantizer``) needs only the Python package; lowering needs
the Qualcomm AI Engine Direct SDK. ExecuTorch's Qualcomm code can download
that SDK when ``QNN_SDK_ROOT`` is unset, so edgeq imports it lazily, only for
a Qualcomm target, and only lets it download when the user opts in
(``--allow-sdk-download``).
"""

from __future__ import annotations

import os

import torch

from .errors import SdkMissingError
from .plan import Plan
from .quantizer import RangeConfig, layer_owners, swap_fake_quants
from .targets import Target

SDK_HELP = (
    "install the Qualcomm AI Engine Direct (QAIRT) SDK from Qualcomm's developer site and "
    "export QNN_SDK_ROOT=/path/to/qairt/<version>, or rerun with --allow-sdk-download"
)


def sdk_available() -> bool:
    root = os.environ.get("QNN_SDK_ROOT")
    return bool(root) and os.path.isdir(root)


_original_setup = None


def forbid_sdk_download() -> None:
    """Replace ExecuTorch's SDK setup with a refusal while the SDK is absent.

    QnnQuantizer asks for the SDK's op info and, with QNN_SDK_ROOT unset,
    ExecuTorch's setup starts a download; refusing makes it fall back to its
    SDK-free op info, which is what quantizing without the SDK needs.
    """
    global _original_setup
    if sdk_available():
        return
    from executorch.backends.qualcomm.utils import qnn_sdk_setup

    if _original_setup is None:
        _original_setup = qnn_sdk_setup.setup_qnn_sdk

        def refuse() -> None:
            raise SdkMissingError("QNN SDK download refused: QNN_SDK_ROOT is not set", SDK_HELP)

        qnn_sdk_setup.setup_qnn_sdk = refuse


def ensure_sdk(allow_download: bool = False) -> None:
    """Make the SDK usable, or refuse in one line; never downloads unless allowed."""
    if sdk_available():
        return
    if not allow_download:
        raise SdkMissingError("the Qualcomm AI Engine Direct SDK is needed to write model.pte for QNN HTP "
                              "(QNN_SDK_ROOT is not set)", SDK_HELP)
    from executorch.backends.qualcomm.utils import qnn_sdk_setup

    global _original_setup
    if _original_setup is not None:
        qnn_sdk_setup.setup_qnn_sdk, _original_setup = _original_setup, None
    qnn_sdk_setup.setup_qnn_sdk()


def _quant_dtype(name: str):
    from executorch.backends.qualcomm.quantizer.quantizer import QuantDtype

    return QuantDtype[name]


def _adapt(module_qconfig, ranges: RangeConfig):
    """Put edgeq's chosen QAT fake-quant into a ModuleQConfig's configs."""
    module_qconfig.quant_config = swap_fake_quants(module_qconfig.quant_config, True, ranges)
    module_qconfig.per_channel_quant_config_list = [
        swap_fake_quants(c, True, ranges) for c in module_qconfig.per_channel_quant_config_list]
    return module_qconfig


def build_qnn_quantizer(plan: Plan, target: Target, qat: bool, ranges: RangeConfig):
    forbid_sdk_download()
    from executorch.backends.qualcomm.quantizer.quantizer import ModuleQConfig, QnnQuantizer

    def module_qconfig(precision: str):
        spec = target.precisions[precision]
        mq = ModuleQConfig(quant_dtype=_quant_dtype(spec.backend_dtype), is_qat=qat,
                           is_conv_per_channel=True, is_linear_per_channel=True)
        return _adapt(mq, ranges) if qat else mq

    quantizer = QnnQuantizer()
    quantizer.default_quant_config = module_qconfig(target.default_precision)
    owners_by_graph: dict[int, dict] = {}
    layers = [entry.name for entry in plan.layers]

    def owner(node: torch.fx.Node) -> str | None:
        graph = node.graph
        if id(graph) not in owners_by_graph:
            owners_by_graph[id(graph)] = layer_owners(graph.owning_module, layers)
        return owners_by_graph[id(graph)].get(node)

    made: dict[str, object] = {}
    rules = []
    for entry in plan.layers:
        if entry.precision == target.default_precision:
            continue
        if entry.precision not in made:
            made[entry.precision] = module_qconfig(entry.precision)
        rules.append((lambda node, name=entry.name: owner(node) == name, made[entry.precision]))
    quantizer.set_submodule_qconfig_list(rules)
    return quantizer


def qnn_partitioners(target: Target, allow_download: bool = False) -> list:
    ensure_sdk(allow_download)
    from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
    from executorch.backends.qualcomm.utils.utils import (
        generate_htp_compiler_spec,
        generate_qnn_executorch_compiler_spec,
    )

    backend_options = generate_htp_compiler_spec(use_fp16=False)
    specs = generate_qnn_executorch_compiler_spec(soc_model=getattr(QcomChipset, target.chipset),
                                                  backend_options=backend_options)
    return [QnnPartitioner(specs)]
