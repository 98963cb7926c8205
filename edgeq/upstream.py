"""Every patch edgeq applies to torchao and ExecuTorch internals, in one place.

Each patch replaces one upstream attribute, is idempotent, changes speed or
safety but never a program's numbers (except :func:`fuse_relu6`, which fixes
an upstream quantization defect and says so), and is listed in :data:`PATCHES` with
the signature it was written against. ``tests/test_upstream.py`` checks those
signatures against the installed packages, so an upgrade that renames or
reshapes a patched attribute fails a fast test instead of silently turning a
patch off (or worse, wrapping something else).

The build applies them explicitly (:func:`apply`); the stage functions that
need one (prepare/convert, lowering, the QNN quantizer) call it too, so
library users get the same behaviour.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from edgeq.errors import SdkMissingError


@dataclass(frozen=True)
class Patch:
    """One replaced upstream attribute and the parameters it was written against."""

    module: str
    attribute: str
    parameters: tuple[str, ...]
    why: str

    def owner(self) -> Any:
        obj: Any = importlib.import_module(self.module)
        for part in self.attribute.split(".")[:-1]:
            obj = getattr(obj, part)
        return obj

    def current(self) -> Any:
        name = self.attribute.split(".")[-1]
        if name.endswith("]"):  # an entry of a registry dict: "OP_TO_ANNOTATOR[cat]"
            table, key = name[:-1].split("[")
            return getattr(self.owner(), table)[key]
        return getattr(self.owner(), name)


PATCHES: tuple[Patch, ...] = (
    Patch(
        "torchao.quantization.pt2e.utils",
        "_get_aten_graph_module_for_pattern",
        ("pattern", "example_inputs", "is_cuda", "kwargs"),
        "memoise conv-BN pattern graphs: prepare/convert re-export them for every conv-BN pair (30 s -> 0.03 s)",
    ),
    Patch(
        "torchao.quantization.pt2e.qat_utils",
        "_get_aten_graph_module_for_pattern",
        ("pattern", "example_inputs", "is_cuda", "kwargs"),
        "the same function, imported by name in qat_utils",
    ),
    Patch(
        "executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils",
        "_get_aten_graph_module_for_pattern",
        ("pattern", "example_inputs", "is_cuda", "kwargs"),
        "the same function, imported by name by XNNPACK",
    ),
    Patch(
        "executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils",
        "_do_annotate_conv_bn",
        ("gm", "quantization_config", "filter_fn", "has_relu", "is_conv_transpose"),
        "skip building conv-BN pattern graphs on a graph without BatchNorm (edgeq folds BN before QAT)",
    ),
    Patch(
        "executorch.backends.xnnpack._passes.convert_to_upsample_bilinear2d",
        "ConvertToUpsampleBilinear2d.call",
        ("self", "graph_module"),
        "skip four pattern exports (4 s a process) on graphs with no upsample or index op",
    ),
    Patch(
        "executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils",
        "is_relu_node",
        ("node",),
        "while edgeq annotates: ReLU6 (hardtanh) fuses into the conv/linear/add before it as ReLU does",
    ),
    Patch(
        "executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils",
        "OP_TO_ANNOTATOR[cat]",
        ("gm", "quantization_config", "filter_fn"),
        "while edgeq annotates: the cat annotator honours the filter (it ignores it upstream, so every "
        "concatenation took the first layer config, float_ops and other_ops = float included)",
    ),
    Patch(
        "executorch.backends.xnnpack._passes.insert_pad_qdq",
        "InsertPadQDQPass.call",
        ("self", "graph_module"),
        "leave a pad that feeds a float conv unquantized, so a plan may keep that conv in float",
    ),
    Patch(
        "executorch.backends.qualcomm.quantizer.observers.concat_observer",
        "ConcatObserver.__init__",
        (
            "self",
            "node_name",
            "graph",
            "dtype",
            "qscheme",
            "reduce_range",
            "quant_min",
            "quant_max",
            "factory_kwargs",
            "eps",
            "is_dynamic",
            "kwargs",
        ),
        "a __deepcopy__ that shares the graph nodes it holds (concat_node, input_nodes): copying them copies "
        "their meta's fake tensors and fails, so no QNN model with a concatenation could be converted",
    ),
    Patch(
        "executorch.backends.qualcomm.quantizer.observers.concat_observer",
        "ConcatObserver.forward",
        ("self", "x_orig"),
        "a softmax feeding a concatenation keeps its own [0, 1] encoding: the HTP's softmax ignores a "
        "non-zero output offset, so the concatenation's shared range made its probabilities garbage",
    ),
    Patch(
        "executorch.backends.qualcomm._passes.layout_transform",
        "LayoutTransform.is_layout_sensitive",
        ("self", "node"),
        "a softmax over channels is channel-last wherever the traversal meets it (upstream only in its first "
        "sweep), so no second permute lands behind it: QNN refused every such graph at execute",
    ),
    Patch(
        "executorch.backends.qualcomm._passes.annotate_quant_attrs",
        "AnnotateQuantAttrs._annotate_requant",
        ("self", "n"),
        "a sigmoid whose consumer takes another dtype (a 16-bit concatenation) is requantized: upstream never "
        "requantizes a sigmoid, and QNN then refused the 8-bit input into the 16-bit Concat",
    ),
    Patch(
        "executorch.backends.qualcomm.utils.qnn_sdk_setup",
        "setup_qnn_sdk",
        (),
        "refuse ExecuTorch's Qualcomm SDK download unless the user allowed it",
    ),
)

_applied: set[str] = set()


def _once(name: str) -> bool:
    if name in _applied:
        return False
    _applied.add(name)
    return True


def memoise_pattern_graphs() -> None:
    """Export each of torchao's conv-BN pattern graphs once per key.

    ``prepare_qat_pt2e`` and ``convert_pt2e`` re-export the same small pattern
    functions with torch.export for every conv-BN pair (about 0.3 s each, 96
    times for four pairs in convert); the graphs depend only on the pattern
    and its example inputs' shapes, so one export per key is enough. The
    replacement engine copies the graphs it matches, so sharing is safe.
    """
    if not _once("patterns"):
        return
    from torchao.quantization.pt2e import qat_utils, utils

    original = utils._get_aten_graph_module_for_pattern
    cache: dict = {}

    def key_of(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("T", tuple(value.shape), value.dtype, value.device.type)
        if isinstance(value, (tuple, list)):
            return tuple(key_of(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, key_of(v)) for k, v in value.items()))
        return value

    def pattern_key(pattern: Any) -> Any:
        fn = getattr(pattern, "fn", pattern)  # torchao wraps closures in WrapperModule
        code = getattr(fn, "__code__", None)
        if code is None:
            return pattern
        cells = tuple(key_of(c.cell_contents) for c in (fn.__closure__ or ()))
        return (code, cells)

    @functools.wraps(original)
    def cached(pattern: Any, example_inputs: Any, is_cuda: bool = False, **kwargs: Any) -> Any:
        key = (pattern_key(pattern), key_of(example_inputs), is_cuda, key_of(kwargs))
        if key not in cache:
            cache[key] = original(pattern, example_inputs, is_cuda, **kwargs)
        # Callers mutate the returned graph (they strip and rewrite nodes).
        return copy.deepcopy(cache[key])

    utils._get_aten_graph_module_for_pattern = cached
    qat_utils._get_aten_graph_module_for_pattern = cached
    try:
        from executorch.backends.xnnpack.quantizer import xnnpack_quantizer_utils as xnn
    except ImportError:  # torchao without ExecuTorch (the GPU benchmark machine)
        return
    xnn._get_aten_graph_module_for_pattern = cached
    annotate_conv_bn = xnn._do_annotate_conv_bn

    @functools.wraps(annotate_conv_bn)
    def skip_without_bn(gm: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        # Matching needs the pattern graphs; a graph with no BatchNorm cannot match.
        if not any("batch_norm" in str(n.target) for n in gm.graph.nodes if n.op == "call_function"):
            return []
        return annotate_conv_bn(gm, *args, **kwargs)

    xnn._do_annotate_conv_bn = skip_without_bn


def skip_idle_bilinear_matching() -> None:
    """Spare XNNPACK's ConvertToUpsampleBilinear2d its pattern graphs where it cannot match.

    The first time the pass runs in a process it exports four interpolate
    models (torch.export + to_edge: 4 s of every build on the CI machine) only
    to match them against the graph. A decomposed bilinear upsample always
    contains index ops and an undecomposed one is an upsample_bilinear2d node;
    a graph with neither has nothing to match, and the pass then only retraces
    it, which it still does here.
    """
    if not _once("bilinear"):
        return
    from executorch.backends.xnnpack._passes import convert_to_upsample_bilinear2d as module
    from executorch.backends.xnnpack._passes.xnnpack_pass import XNNPACKPass
    from torch.fx.passes.infra.pass_base import PassResult

    cls = module.ConvertToUpsampleBilinear2d
    original = cls.call

    def call(self: Any, graph_module: torch.fx.GraphModule) -> PassResult:
        names = {str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"}
        if any("upsample_bilinear2d" in name or "index" in name for name in names):
            return original(self, graph_module)
        graph_module.recompile()
        return PassResult(XNNPACKPass.call(self, graph_module).graph_module, True)

    cls.call = call  # type: ignore[method-assign]


def float_conv_after_pad() -> None:
    """Keep XNNPACK's InsertPadQDQPass from quantizing a pad that feeds a float conv.

    The pass gives every zero pad whose input is dequantized an implicit q/dq,
    assuming a quantized conv follows (EfficientNet's static "same" padding sits
    between a ReLU6 and a stride-2 depthwise conv). When the plan keeps that conv
    in float, the conv then meets a quantized input and float weights, and
    lowering fails ("Weight and Input should both be quantized"). Pads feeding
    such a conv are hidden from the pass (their pad value reads as non-zero,
    which the pass skips) and restored right after.
    """
    if not _once("pad"):
        return
    from executorch.backends.xnnpack._passes import insert_pad_qdq as module
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant
    from executorch.exir.dialects._ops import ops as exir_ops

    cls = module.InsertPadQDQPass
    original = cls.call
    gemms = (exir_ops.edge.aten.convolution.default, exir_ops.edge.aten.linear.default)

    def feeds_float_gemm(node: torch.fx.Node) -> bool:
        return any(
            user.target in gemms
            and len(user.args) > 1
            and isinstance(user.args[1], torch.fx.Node)
            and not is_dequant(user.args[1])
            for user in node.users
        )

    @functools.wraps(original)
    def call(self: Any, graph_module: torch.fx.GraphModule) -> Any:
        hidden = []
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and node.target == exir_ops.edge.aten.constant_pad_nd.default:
                if feeds_float_gemm(node):
                    hidden.append((node, node.args))
                    node.args = (node.args[0], node.args[1], float("nan"))
        try:
            return original(self, graph_module)
        finally:
            for node, args in hidden:
                node.args = args

    cls.call = call  # type: ignore[method-assign]


QNN_SDK_HELP = (
    "install the host HTP runtime with `pip install -e '.[qnn]'` (then `edgeq qnn-setup` checks it), or install "
    "the Qualcomm AI Engine Direct (QAIRT) SDK and export QNN_SDK_ROOT=/path/to/qairt/<version>, or rerun with "
    "--allow-sdk-download"
)

_qnn_setup: Callable[[], None] | None = None


def forbid_qnn_sdk_download() -> None:
    """Replace ExecuTorch's Qualcomm SDK setup with a refusal while the SDK is absent.

    QnnQuantizer asks for the SDK's op info and, with QNN_SDK_ROOT unset,
    ExecuTorch's setup starts a download; refusing makes it fall back to its
    SDK-free op info, which is what quantizing without the SDK needs.
    """
    global _qnn_setup
    root = os.environ.get("QNN_SDK_ROOT")
    if (root and os.path.isdir(root)) or _qnn_setup is not None:
        return
    from executorch.backends.qualcomm.utils import qnn_sdk_setup

    _qnn_setup = qnn_sdk_setup.setup_qnn_sdk

    def refuse() -> Any:
        # edgeq may have pointed QNN_SDK_ROOT at libraries since (the host HTP runtime): then
        # ExecuTorch's setup only reads them and downloads nothing.
        root = os.environ.get("QNN_SDK_ROOT")
        if root and os.path.isdir(root) and _qnn_setup is not None:
            return _qnn_setup()
        raise SdkMissingError("QNN SDK download refused: QNN_SDK_ROOT is not set", QNN_SDK_HELP)

    qnn_sdk_setup.setup_qnn_sdk = refuse


def allow_qnn_sdk_download() -> Callable[[], None]:
    """Undo :func:`forbid_qnn_sdk_download` (the user passed --allow-sdk-download); returns the setup."""
    global _qnn_setup
    from executorch.backends.qualcomm.utils import qnn_sdk_setup

    if _qnn_setup is not None:
        qnn_sdk_setup.setup_qnn_sdk, _qnn_setup = _qnn_setup, None
    return qnn_sdk_setup.setup_qnn_sdk


_QNN_LLM = "executorch.examples.qualcomm.oss_scripts.llama"


def qnn_static_llama() -> Any:
    """ExecuTorch's QNN LLM model module (``static_llama``: the Llama its Qualcomm LLM flow quantizes
    and lowers), imported without its package's ``__init__``.

    That ``__init__`` registers every model the flow knows and imports their weight converters,
    which need torchtune; torchtune 0.6.1 (the newest) imports a torchao module torchao 0.18 no
    longer has, so the package cannot be imported here at all. ``static_llama`` itself needs none of
    it: an empty package object with the right ``__path__`` lets its own imports resolve.
    """
    import sys
    import types

    if _QNN_LLM not in sys.modules:
        parent = importlib.import_module(_QNN_LLM.rsplit(".", 1)[0])
        package = types.ModuleType(_QNN_LLM)
        package.__path__ = [os.path.join(list(parent.__path__)[0], "llama")]
        sys.modules[_QNN_LLM] = package
    return importlib.import_module(f"{_QNN_LLM}.model.static_llama")


def _is_relu_or_relu6(node: Any) -> bool:
    return node.op == "call_function" and node.target in (
        torch.ops.aten.relu.default,
        torch.ops.aten.relu_.default,
        torch.ops.aten.hardtanh.default,
        torch.ops.aten.hardtanh_.default,
    )


@contextlib.contextmanager
def fuse_relu6() -> Iterator[None]:
    """While XNNPACKQuantizer annotates, treat hardtanh (ReLU6) as the ReLU its fused patterns look for.

    XNNPACKQuantizer fuses conv/linear/add + ReLU (no observer between them) but
    not + ReLU6, so a ReLU6 network's conv output is quantized on its own
    pre-activation range (up to ~100 in EfficientNet-Lite) before the clamp to
    [0, 6] leaves a dozen levels: measured on EfficientNet-Lite0, the documented
    PTQ flow loses 6 top-1 points, and the output SQNR of the first depthwise
    conv falls from 38 dB to 16 dB. XNNPACK itself fuses hardtanh into those ops
    (its FuseActivationPass takes relu and hardtanh alike), so the fused
    annotation is the one its kernels run.
    """
    from executorch.backends.xnnpack.quantizer import xnnpack_quantizer_utils as utils

    original = utils.is_relu_node
    utils.is_relu_node = _is_relu_or_relu6
    try:
        yield
    finally:
        utils.is_relu_node = original


@contextlib.contextmanager
def cat_honours_filter() -> Iterator[None]:
    """While XNNPACKQuantizer annotates, its cat annotator skips the concatenations the filter rejects.

    XNNPACK's ``_annotate_cat`` takes a ``filter_fn`` and never calls it: the
    first quantizer pass (edgeq annotates layer by layer, one pass per config)
    claims every concatenation in the graph with that pass's config, so a
    plan's float ops and ``other_ops = "float"`` were quantized anyway, with one
    shared scale over inputs as different as pixels and probabilities. The
    rejected concatenations are marked annotated for the duration of the
    upstream call (``_is_annotated`` then skips them) and unmarked after.
    """
    from executorch.backends.xnnpack.quantizer import xnnpack_quantizer_utils as utils
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    original = utils.OP_TO_ANNOTATOR["cat"]
    key = "quantization_annotation"

    @functools.wraps(original)
    def annotate_cat(gm: torch.fx.GraphModule, quantization_config: Any, filter_fn: Any = None) -> Any:
        hidden = [
            n
            for n in gm.graph.nodes
            if n.op == "call_function"
            and n.target == torch.ops.aten.cat.default
            and key not in n.meta
            and filter_fn is not None
            and not filter_fn(n)
        ]
        for n in hidden:
            n.meta[key] = QuantizationAnnotation(_annotated=True)
        try:
            return original(gm, quantization_config, filter_fn)
        finally:
            for n in hidden:
                del n.meta[key]

    utils.OP_TO_ANNOTATOR["cat"] = annotate_cat
    try:
        yield
    finally:
        utils.OP_TO_ANNOTATOR["cat"] = original


def copyable_concat_observer() -> None:
    """Give QNN's ConcatObserver a deepcopy that shares the fx nodes it keeps.

    The observer stores the concatenation's node and its input nodes; deepcopying
    the prepared graph (edgeq converts a copy and keeps the QAT model) then deep-copies
    those nodes and their meta, whose fake tensors refuse (RuntimeError "Cannot access
    data pointer of Tensor"). Every QNN build of a model with a concatenation failed there.
    The copy keeps the node references (they are only read to find the input observers,
    which the copy maps to its own through the deepcopy memo) and copies the rest.
    """
    if not _once("copyable_concat_observer"):
        return
    from executorch.backends.qualcomm.quantizer.observers.concat_observer import ConcatObserver

    def deepcopy(self: ConcatObserver, memo: dict[int, Any]) -> ConcatObserver:
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            shared = key in ("concat_node", "input_nodes")
            clone.__dict__[key] = value if shared else copy.deepcopy(value, memo)
        return clone

    ConcatObserver.__deepcopy__ = deepcopy


_SOFTMAX_TARGETS = ("aten.softmax.int", "aten._softmax.default", "aten._safe_softmax.default")


def concat_keeps_softmax_encoding() -> None:
    """Leave a softmax's output observer out of QNN's shared concatenation range.

    QNN's ``ConcatObserver`` writes the concatenation's range into every input's observer,
    so all inputs share one encoding. A detector head concatenates signed box offsets with
    softmax class probabilities; the shared encoding then has a non-zero offset, and the HTP's
    softmax writes its output as if the offset were 0 (measured on the simulator: probabilities
    came back near -0.6, 0.35-0.56 from the reference, while the same graph with the softmax
    alone, or with only non-negative inputs, matched within one step). With the softmax's own
    observer left alone, its [0, 1] encoding has offset 0 and the lowering inserts QNN's
    requantize in front of the concatenation; the program then matches its reference.
    """
    if not _once("concat_keeps_softmax_encoding"):
        return
    from executorch.backends.qualcomm.quantizer.observers.concat_observer import ConcatObserver

    shared_range = ConcatObserver.forward

    @functools.wraps(shared_range)
    def forward(self: ConcatObserver, x_orig: torch.Tensor) -> torch.Tensor:
        if not self.input_observers:  # the first call links the input observers: leave softmaxes out
            self.input_nodes = [n for n in self.input_nodes if str(n.target) not in _SOFTMAX_TARGETS]
        return shared_range(self, x_orig)

    ConcatObserver.forward = forward


def requantize_sigmoid_across_dtypes() -> None:
    """Let QNN requantize a sigmoid's output where its consumer takes another dtype.

    ``AnnotateQuantAttrs`` records a requantize wherever a quantize is followed by a dequantize
    with other parameters, except after a sigmoid ("a fixed scale op"). A detector head whose
    output concatenation takes 16-bit activations (edgeq's wide_ops on the HTP) then feeds the
    sigmoid's 8-bit objectness straight into a 16-bit Concat, which QNN's op validation refuses
    ("Unsupported input/output datatypes ... in[0]: UFIXED_POINT_8, out[0]: UFIXED_POINT_16"),
    leaving the concatenation on the CPU (FastestDet on sm8650). For a sigmoid the requantize is
    recorded where the dtypes differ; a sigmoid into a consumer of its own dtype is left as upstream
    leaves it.
    """
    if not _once("requantize_sigmoid_across_dtypes"):
        return
    from executorch.backends.qualcomm._passes.annotate_quant_attrs import AnnotateQuantAttrs

    record = AnnotateQuantAttrs._annotate_requant

    @functools.wraps(record)
    def _annotate_requant(self: AnnotateQuantAttrs, n: torch.fx.Node) -> None:
        source = n.args[0] if n.args else None
        if not (isinstance(source, torch.fx.Node) and source.target in self.skip_requant_allowlist):
            return record(self, n)
        saved = self.skip_requant_allowlist, self.skip_advanced_requant
        self.skip_requant_allowlist, self.skip_advanced_requant = set(), True  # dtype changes only
        try:
            return record(self, n)
        finally:
            self.skip_requant_allowlist, self.skip_advanced_requant = saved

    AnnotateQuantAttrs._annotate_requant = _annotate_requant


def qnn_channel_softmax_layout() -> None:
    """Make QNN's layout pass treat a softmax over channels as layout-sensitive everywhere.

    ``LayoutTransform`` moves such a softmax to channel-last (QNN's softmax takes the last
    axis only) by listing it among its starting nodes, but its traversal asks
    ``is_layout_sensitive``, which knows only the fixed op set. When the traversal reaches
    the softmax from a consumer first (a detector head: conv -> softmax(dim=1) -> cat with
    other conv branches), it inserts a NCHW->NHWC permute behind the softmax, and the
    softmax is then made channel-last as well: its output is permuted twice, and QNN fails
    at execute ("concat.cc: tensor 2 has mismatched dim"). Counting the conditional case
    as sensitive is what the pass's own comment says it means.
    """
    if not _once("qnn_channel_softmax_layout"):
        return
    from executorch.backends.qualcomm._passes.layout_transform import LayoutTransform

    fixed = LayoutTransform.is_layout_sensitive

    @functools.wraps(fixed)
    def is_layout_sensitive(self: LayoutTransform, node: torch.fx.Node) -> bool:
        return fixed(self, node) or self.conditional_sensitive_check(node)

    LayoutTransform.is_layout_sensitive = is_layout_sensitive


_QUANT_ANNOTATION = "quantization_annotation"


def honour_channel_axes(prepared: torch.fx.GraphModule) -> int:
    """Give each per-channel weight fake-quant the channel axis its quantizer annotated; returns how many changed.

    torchao's prepare passes a spec's ``ch_axis`` only to classes whose name contains
    "PerChannel" (its observers); every fake-quant (torchao's own FakeQuantize and
    FusedMovingAvgObsFakeQuantize, edgeq's adaptive one) gets its default, axis 0. A
    transposed convolution's weight is [in, out, k...] and XNNPACK and QNN annotate it per
    channel on axis 1, so QAT scaled it per input channel, and XNNPACK then refused the
    converted weight (its dequantize stayed outside the delegate and the program failed to
    serialize: "Missing out variants: dequantize_per_channel"). Runs before any forward, while
    the fake-quants have no per-channel state yet.
    """
    modules = dict(prepared.named_modules())
    changed = 0
    for node in prepared.graph.nodes:
        annotation = node.meta.get(_QUANT_ANNOTATION)
        if annotation is None:
            continue
        for source, qspec in annotation.input_qspec_map.items():
            axis = getattr(qspec, "ch_axis", None)
            if axis is None or qspec.qscheme not in (torch.per_channel_symmetric, torch.per_channel_affine):
                continue
            for arg in node.all_input_nodes:
                module = modules.get(str(arg.target)) if arg.op == "call_module" else None
                if module is None or arg.args[:1] != (source,) or getattr(module, "ch_axis", axis) == axis:
                    continue
                module.ch_axis = axis
                observer = getattr(module, "activation_post_process", None)
                if observer is not None and hasattr(observer, "ch_axis"):
                    observer.ch_axis = axis
                changed += 1
    return changed


def register_quantized_embedding_ops() -> None:
    """Make ``quantized_decomposed::embedding_byte/_4bit`` callable ops and runnable kernels.

    ExecuTorch defines the ops' Python side (for the reference graph and for
    export) in a private module that its own LLM export imports, and their
    host-runtime kernels in ``executorch.kernels.quantized``; without both
    imports a quantized embedding neither runs in torch nor loads in
    executorch.runtime. tests/test_embeddings.py checks the module still exists.
    """
    if _once("quantized_embedding_ops"):
        importlib.import_module("executorch.exir.passes._quant_patterns_and_replacements")
        importlib.import_module("executorch.kernels.quantized")


#: graph.meta key: each dropout's rate, in graph order, as the model had them
DROPOUT_RATES = "edgeq_dropout_rates"


def _dropouts(model: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in model.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.dropout.default]


def record_dropout_rates(model: torch.fx.GraphModule) -> list[float]:
    """Remember the model's dropout rates (once; later calls return what was recorded)."""
    if DROPOUT_RATES not in model.meta:
        model.meta[DROPOUT_RATES] = [float(n.args[1]) for n in _dropouts(model)]  # type: ignore[arg-type]
    return list(model.meta[DROPOUT_RATES])


#: graph.meta key: each batch norm's (momentum, eps), in graph order, as the model had them
BATCH_NORM_SETTINGS = "edgeq_batch_norm_settings"


def _batch_norms(model: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [
        n
        for n in model.graph.nodes
        if n.op == "call_function" and "batch_norm" in str(n.target) and _arg_position(n, "eps") is not None
    ]


def _arg_position(node: torch.fx.Node, name: str) -> int | None:
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    return names.index(name) if name in names else None


def batch_norm_setting(node: torch.fx.Node, name: str) -> float:
    """A batch norm node's ``eps``, ``momentum`` or ``training`` argument, wherever the call put it
    (0 for one its op does not take: ``training`` of the inference-only op)."""
    at = _arg_position(node, name)
    if at is None:
        return 0.0
    if at < len(node.args):
        return float(node.args[at])  # type: ignore[arg-type]
    default = node.target._schema.arguments[at].default_value  # type: ignore[union-attr]
    return float(node.kwargs.get(name, default))  # type: ignore[arg-type]


def record_batch_norm_settings(model: torch.fx.GraphModule) -> list[tuple[float, float]]:
    """Remember each batch norm's momentum and eps (once; later calls return what was recorded)."""
    if BATCH_NORM_SETTINGS not in model.meta:
        model.meta[BATCH_NORM_SETTINGS] = [
            (batch_norm_setting(n, "momentum"), batch_norm_setting(n, "eps")) for n in _batch_norms(model)
        ]
    return list(model.meta[BATCH_NORM_SETTINGS])


def _restore(model: torch.fx.GraphModule, what: str, nodes: list, values: list, put: Callable) -> None:
    if len(nodes) != len(values):
        raise RuntimeError(
            f"torchao's train/eval switch left {len(nodes)} {what} ops where the model had {len(values)}: "
            "edgeq.upstream.move_to_train needs updating for this torchao"
        )
    for node, value in zip(nodes, values):
        put(node, value)


def _put_bn(node: torch.fx.Node, settings: tuple[float, float]) -> None:
    args, kwargs = list(node.args), dict(node.kwargs)
    for name, value in zip(("momentum", "eps"), settings):
        at = _arg_position(node, name)
        assert at is not None
        if at < len(args):
            args[at] = value
        else:
            kwargs[name] = value
    node.args, node.kwargs = tuple(args), kwargs


def _switch(model: torch.fx.GraphModule, train: bool) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    rates = record_dropout_rates(model)
    norms = record_batch_norm_settings(model)
    (move_exported_model_to_train if train else move_exported_model_to_eval)(model)

    def put_rate(node: torch.fx.Node, rate: float) -> None:
        node.args = (node.args[0], rate, *node.args[2:])

    _restore(model, "dropout", _dropouts(model), rates, put_rate)
    _restore(model, "batch norm", _batch_norms(model), norms, _put_bn)
    model.recompile()
    return model


def move_to_train(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """torchao's ``move_exported_model_to_train``, keeping every dropout's own rate and every
    batch norm's own eps and momentum.

    torchao (0.18) rewrites a standalone batch norm (one not folded into a conv: ESPNet's after
    each concatenation) with a pattern that writes PyTorch's default eps 1e-5 back over the
    model's (its source says so: "fails to support custom momentum and eps value"); ESPNet's
    eps 1e-3 over running variances near 1e-6 turned its QAT graph to noise (SQNR -70 dB with
    every fake-quant off). Recorded and put back like the dropout rates.

    torchao (0.18) switches dropout by rewriting each ``aten.dropout`` with a
    pattern written as ``F.dropout(x, p=0.5)``; it matches any rate
    (``ignore_literals``) but writes 0.5 back, so a BERT layer's 0.1 trained
    at 0.5: the prepared int8 MiniLM's training-mode output fell to cosine
    0.17 of float (0.80 with the real rates; 0.86 in eval mode). The rates
    are recorded from the captured graph and put back after each switch, in
    graph order (the rewrite keeps it). tests/test_upstream.py notices when
    torchao keeps the rate itself.
    """
    return _switch(model, train=True)


def move_to_eval(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """torchao's ``move_exported_model_to_eval``, keeping every dropout's own rate (see :func:`move_to_train`)."""
    return _switch(model, train=False)


def apply() -> None:
    """The patches every build needs (the Qualcomm one is applied by the QNN backend)."""
    memoise_pattern_graphs()
    try:
        skip_idle_bilinear_matching()
        float_conv_after_pad()
    except ImportError:  # torchao without ExecuTorch
        pass
