"""Qualcomm HTP (NPU) through ExecuTorch's QNN backend.

Quantizing (``QnnQuantizer``) needs only the Python package; lowering and
running need Qualcomm's QNN libraries: a QAIRT SDK at ``QNN_SDK_ROOT``, or the
host HTP runtime from PyPI (``pip install -e '.[qnn]'``, see
:mod:`edgeq.backends.qnn_host`), whose HTP library simulates the NPU on an
x86_64 host, so a build validates the ``.pte`` itself. ExecuTorch's Qualcomm
code can download an SDK when ``QNN_SDK_ROOT`` is unset; edgeq refuses that
unless the user opts in (``--allow-sdk-download``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edgeq import upstream
from edgeq.backends import qnn_host
from edgeq.backends.base import AppRuntime, Backend
from edgeq.errors import EdgeqError, SdkMissingError
from edgeq.graph import attr_tensor, layer_kind, layer_owners
from edgeq.logs import native_stderr
from edgeq.quant.configs import RangeConfig, swap_fake_quants

if TYPE_CHECKING:
    from edgeq.planning.plan import Plan
    from edgeq.runtime import ProgramRunner
    from edgeq.targets import Precision, Target


SDK_HELP = upstream.QNN_SDK_HELP


#: Hexagon (HTP) architecture of each chipset edgeq targets, for the libraries an app carries
HTP_ARCH = {"SM8550": "V73", "SM8650": "V75", "SM8750": "V79"}


def ensure_sdk(allow_download: bool = False) -> qnn_host.QnnLibraries:
    """Load this machine's QNN libraries, or refuse in one line; never downloads unless allowed."""
    if qnn_host.available():
        return qnn_host.activate()
    if not allow_download:
        raise SdkMissingError(
            "Qualcomm's QNN libraries are needed to write model.pte for QNN HTP (QNN_SDK_ROOT is not set and the "
            "host HTP runtime is not installed)",
            SDK_HELP,
        )
    upstream.allow_qnn_sdk_download()()
    return qnn_host.activate()


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


def _named(name: str) -> Callable[[torch.fx.Node], bool]:
    return lambda node: node.name == name


def _owned_by(owner: Callable[[torch.fx.Node], str | None], name: str) -> Callable[[torch.fx.Node], bool]:
    return lambda node: owner(node) == name


_BATCH_NORMS = ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default")


def batch_norms_as_depthwise_convs(graph: torch.fx.GraphModule) -> int:
    """Replace each batch norm left in the captured graph by the depthwise 1x1 convolution it computes.

    A batch norm right after a convolution is folded into it (by capture for QAT, by torchao's
    prepare for PTQ) and left alone here; the others stand alone (a
    spectrogram normaliser in front of a keyword spotter, ESPNet's BN + PReLU after a concatenation).
    ExecuTorch's QNN lowering of such a batch norm computes something else on the HTP: measured on
    the simulator, a BatchNorm2d alone came out at -10 dB SQNR against its quantized reference (the
    same with ExecuTorch's own QnnQuantizer flow, no edgeq in it), and the FSDD keyword spotter
    scored 10% (chance) against 77% in float. A depthwise convolution whose per-channel weight is
    gamma / sqrt(var + eps) and whose bias is beta - mean * weight is the same function in float,
    and the HTP runs convolutions right. Returns how many batch norms were replaced.
    """
    replaced = 0
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or str(node.target) not in _BATCH_NORMS:
            continue
        x = node.args[0]
        value = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if value is None or value.dim() not in (3, 4) or upstream.batch_norm_setting(node, "training"):
            continue
        if layer_kind(x) == "conv" and len(x.users) == 1:  # type: ignore[arg-type]
            continue  # torchao folds it into that convolution
        rank = value.dim()
        weight, bias = _depthwise_parameters(graph, node, rank)
        channels, name = weight.shape[0], f"{node.name}_depthwise"
        fake_mode = getattr(value, "fake_mode", None)
        with graph.graph.inserting_before(node):
            nodes = []
            for suffix, parameter in (("weight", weight), ("bias", bias)):
                graph.register_parameter(f"{name}_{suffix}", parameter)
                attr = graph.graph.get_attr(f"{name}_{suffix}")
                attr.meta["val"] = fake_mode.from_tensor(parameter) if fake_mode is not None else parameter
                nodes.append(attr)
            ones, zeros = [1] * (rank - 2), [0] * (rank - 2)
            conv_op = torch.ops.aten.conv2d.default if rank == 4 else torch.ops.aten.conv1d.default
            conv = graph.graph.call_function(conv_op, (x, nodes[0], nodes[1], ones, zeros, ones, channels))
        conv.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
        out = node.meta.get("val")
        conv.meta["val"] = out[0] if isinstance(out, (tuple, list)) else out
        _replace_batch_norm_output(node, conv)
        replaced += 1
    if replaced:
        graph.graph.eliminate_dead_code()
        graph.recompile()
    return replaced


def _depthwise_parameters(
    graph: torch.fx.GraphModule, node: torch.fx.Node, rank: int
) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """Weight and bias of the depthwise 1x1 convolution an inference batch norm computes: PyTorch's
    conv-BN folding applied to the identity depthwise convolution."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    def tensor(arg: Any) -> torch.Tensor | None:
        return attr_tensor(graph, str(arg.target)).detach().float() if isinstance(arg, torch.fx.Node) else None

    gamma, beta, mean, var = (tensor(a) for a in node.args[1:5])
    assert mean is not None and var is not None, "an inference batch norm carries its running statistics"
    channels = mean.shape[0]
    identity = torch.ones(channels, 1, *([1] * (rank - 2)), requires_grad=True)  # trainable, as QAT may tune them
    zero = torch.zeros(channels, requires_grad=True)
    return fuse_conv_bn_weights(identity, zero, mean, var, upstream.batch_norm_setting(node, "eps"), gamma, beta)


def _replace_batch_norm_output(node: torch.fx.Node, conv: torch.fx.Node) -> None:
    """Point the batch norm's users at ``conv`` (through getitem 0 where the op returns a tuple)."""
    if isinstance(node.meta.get("val"), (tuple, list)):
        for user in list(node.users):
            if user.target.__name__ == "getitem" and user.args[1] == 0:  # type: ignore[union-attr]
                user.replace_all_uses_with(conv)
    else:
        node.replace_all_uses_with(conv)


class QnnBackend(Backend):
    name = "qnn"
    title = "Qualcomm QNN (HTP)"
    host_runtime = "the QNN HTP simulator on the host, via executorch.runtime"
    # An HTP context binary carries ~60 KB of its own beyond the weights; the XNNPACK float
    # baseline does not, so a size budget needs the overhead measured on a real HTP program.
    float_baseline_overhead = False
    host_latency = False  # the HTP simulator's speed says nothing about a phone's

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
        upstream.copyable_concat_observer()
        upstream.concat_keeps_softmax_encoding()
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
        for node_name, precision in plan.wide_ops.items():  # mixed-range ops: wider activations, by node
            if precision not in made:
                made[precision] = module_qconfig(precision)
            rules.insert(0, (_named(node_name), made[precision]))
        quantizer.set_submodule_qconfig_list(rules)
        return quantizer

    def ensure_sdk(self, allow_download: bool = False) -> None:
        ensure_sdk(allow_download)

    def rewrite_for_quantization(self, graph: torch.fx.GraphModule) -> int:
        return batch_norms_as_depthwise_convs(graph)

    def to_edge(
        self, model: torch.nn.Module, example_inputs: tuple, target: Target, allow_download: bool = False
    ) -> Any:
        # ExecuTorch's QNN lowering runs Qualcomm's own export passes before partitioning; the
        # generic to_edge_transform_and_lower produces graphs whose I/O QNN cannot bind.
        from executorch.backends.qualcomm.utils.utils import to_edge_transform_and_lower_to_qnn

        specs = self.compiler_specs(target, allow_download)
        upstream.qnn_channel_softmax_layout()
        upstream.requantize_sigmoid_across_dtypes()
        with native_stderr(stdout=True):  # QNN's compiler logs every op at INFO from C++
            return to_edge_transform_and_lower_to_qnn(model, example_inputs, specs)

    def to_edge_with_intermediates(self, model: torch.nn.Module, example_inputs: tuple, target: Target) -> Any:
        from executorch.backends.qualcomm.utils.utils import to_edge_transform_and_lower_to_qnn

        specs = self.compiler_specs(target, dump_intermediate_outputs=True)
        upstream.qnn_channel_softmax_layout()
        upstream.requantize_sigmoid_across_dtypes()
        with native_stderr(stdout=True):
            return to_edge_transform_and_lower_to_qnn(model, example_inputs, specs, generate_etrecord=True)

    def compiler_specs(
        self, target: Target, allow_download: bool = False, dump_intermediate_outputs: bool = False
    ) -> list[Any]:
        ensure_sdk(allow_download)
        from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
        from executorch.backends.qualcomm.utils.utils import (
            generate_htp_compiler_spec,
            generate_qnn_executorch_compiler_spec,
        )

        return generate_qnn_executorch_compiler_spec(
            soc_model=getattr(QcomChipset, target.chipset),
            backend_options=generate_htp_compiler_spec(use_fp16=False),
            dump_intermediate_outputs=dump_intermediate_outputs,
        )

    def float_partitioners(self) -> list[Any]:
        # The HTP has no float32 path worth a baseline (and needs the SDK to lower at all): sizes are
        # measured against the float XNNPACK program, whose overhead the planner measures apart
        # (float_baseline_overhead = False).
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return [XnnpackPartitioner()]

    def partitioners(self, target: Target, allow_download: bool = False) -> list[Any]:
        from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner

        return [QnnPartitioner(self.compiler_specs(target, allow_download))]

    def runner(self, program: bytes | str | Path) -> ProgramRunner:
        # The runtime's QnnBackend dlopens libQnnHtp.so and libQnnSystem.so; activate() loads them first.
        ensure_sdk()
        from edgeq.runtime import ProgramRunner

        return ProgramRunner(program)

    def program_notes(self, program: bytes) -> dict[str, Any]:
        libs = ensure_sdk()
        expected = qnn_host.executorch_qnn_version()
        notes: dict[str, Any] = {
            "qnn_compiled_with": libs.build_id or "unknown",
            "qnn_libraries": libs.source,
            "executorch_qnn_expected": expected,
        }
        if libs.source == "host-runtime":
            notes["qnn_libraries"] = f"host HTP runtime ({qnn_host.WHEEL} {libs.wheel_version})"
        notes["phone_runtime_matches"] = bool(libs.version) and expected.startswith(libs.version)
        return notes

    def warnings(self, notes: dict[str, Any]) -> list[str]:
        if notes.get("phone_runtime_matches", True):
            return []
        return [
            f"model.pte's HTP context binary was compiled by QNN {notes['qnn_compiled_with']}, and ExecuTorch's "
            f"Android runtime is built against QNN {notes['executorch_qnn_expected']}: a phone whose QNN libraries "
            "are older than the compiler's refuses the context. The host simulator's accuracy above is real; to "
            f"ship to phones, rebuild with the matching QAIRT SDK (QNN_SDK_ROOT=/path/to/qairt/"
            f"{notes['executorch_qnn_expected']}) and package that SDK's libraries."
        ]

    def app_runtime(self, manifest: dict[str, Any]) -> AppRuntime:
        version = manifest["versions"]["executorch"]
        notes = manifest.get("program", {})
        qnn = notes.get("executorch_qnn_expected", qnn_host.executorch_qnn_version())
        arch = HTP_ARCH.get(manifest["target"]["chipset"], "Vxx")
        source = f"QAIRT SDK {qnn}"
        return AppRuntime(
            gradle=(f"org.pytorch:executorch-android-qnn:{version}",),
            note=(
                f"ExecuTorch Android runtime with the QNN backend (executorch {version}, built for QNN {qnn}); "
                "the app also packages Qualcomm's QNN libraries below."
            ),
            libraries={
                "libQnnHtp.so": f"{source}, lib/aarch64-android/",
                "libQnnSystem.so": f"{source}, lib/aarch64-android/",
                f"libQnnHtp{arch}Stub.so": (
                    f"{source}, lib/aarch64-android/ (HTP {arch} of {manifest['target']['chipset']})"
                ),
                f"libQnnHtp{arch}Skel.so": f"{source}, lib/hexagon-{arch.lower()}/unsigned/",
            },
            warnings=tuple(self.warnings(notes)),
        )
