"""Fast checks that every upstream internal edgeq patches or calls privately is still what it was written for."""

from __future__ import annotations

import inspect

import pytest

from edgeq import upstream


@pytest.mark.parametrize("patch", upstream.PATCHES, ids=lambda p: f"{p.module}.{p.attribute}")
def test_patched_attribute_still_exists_with_its_signature(patch):
    current = patch.current()  # AttributeError/ImportError here: the upgrade removed or moved it
    original = getattr(current, "__wrapped__", current)
    assert tuple(inspect.signature(original).parameters) == patch.parameters, (
        f"{patch.module}.{patch.attribute} changed its parameters; re-check edgeq/upstream.py ({patch.why})"
    )


def test_private_calls_still_exist_with_their_signatures():
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from torchao.quantization.pt2e.observer import UniformQuantizationObserverBase
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    assert tuple(inspect.signature(_fuse_conv_bn_).parameters) == ("m",)
    assert tuple(inspect.signature(XNNPACKQuantizer._annotate_for_quantization_config).parameters) == ("self", "model")
    assert tuple(inspect.signature(XNNPACKQuantizer._annotate_all_patterns).parameters) == (
        "self",
        "model",
        "quantization_config",
        "filter_fn",
        "operator_target",
    )
    assert tuple(inspect.signature(UniformQuantizationObserverBase._calculate_qparams).parameters) == (
        "self",
        "min_val",
        "max_val",
    )


def test_patches_apply_once_and_are_installed():
    from executorch.backends.xnnpack._passes import convert_to_upsample_bilinear2d as bilinear
    from torchao.quantization.pt2e import utils

    upstream.apply()
    first = utils._get_aten_graph_module_for_pattern
    call = bilinear.ConvertToUpsampleBilinear2d.call
    upstream.apply()
    assert utils._get_aten_graph_module_for_pattern is first, "applying twice must not wrap twice"
    assert bilinear.ConvertToUpsampleBilinear2d.call is call
    assert first.__wrapped__ is not first  # functools.wraps kept the original reachable


def test_no_module_outside_upstream_assigns_to_an_upstream_attribute(repo_root):
    """Patches live in one place: no other edgeq module rebinds torchao/executorch attributes."""
    import re

    offenders = []
    for path in (repo_root / "edgeq").rglob("*.py"):
        if path.name == "upstream.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(xnn|utils|qat_utils|module|cls|qnn_sdk_setup)\.\w+\s*=[^=]", line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders


def test_quantized_embedding_ops_are_still_where_edgeq_registers_them():
    import torch

    upstream.register_quantized_embedding_ops()
    weight = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)
    scales = torch.tensor([0.5, 0.25])
    ids = torch.tensor([1, 0])
    out = torch.ops.quantized_decomposed.embedding_byte.default(weight, scales, None, -128, 127, ids)
    assert torch.equal(out, torch.tensor([[0.75, 1.0], [0.5, -1.0]]))
    packed = torch.tensor([[(1 + 8) << 4 | (-2 + 8)]], dtype=torch.uint8)
    out4 = torch.ops.quantized_decomposed.embedding_4bit.default(packed, torch.tensor([2.0]), None, -8, 7, ids[:1] * 0)
    assert torch.equal(out4, torch.tensor([[2.0, -4.0]]))


def test_torchao_train_switch_rewrites_batch_norm_eps_and_edgeq_keeps_it():
    """torchao writes eps 1e-5 into every standalone batch norm it switches (one that follows a
    concatenation, as in ESPNet, is not folded into a conv); when this starts failing on the
    first assertion, torchao keeps eps itself and the batch-norm half of edgeq's switch can go."""
    import torch
    from torchao.quantization.pt2e import move_exported_model_to_eval

    from edgeq.capture import capture_for_quantization

    class CatNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 4, 1)
            self.bn = torch.nn.BatchNorm2d(8, eps=1e-3, momentum=0.05)

        def forward(self, x):
            return self.bn(torch.cat([self.a(x), self.b(x)], 1))

    torch.manual_seed(0)
    model = CatNorm().eval()
    model.bn.running_var.fill_(1e-6)  # tiny activations, as ESPNet's (x - mean) / std / 255 input makes
    x = torch.randn(2, 3, 8, 8) * 1e-3

    def settings(graph):
        return [(float(n.args[6]), float(n.args[7])) for n in graph.graph.nodes if "batch_norm" in str(n.target)]

    plain = capture_for_quantization(model, (x,), fold_bn=True)
    assert settings(plain) == [(0.05, 1e-3)]
    move_exported_model_to_eval(plain)
    assert settings(plain) == [(0.1, 1e-5)], "torchao keeps batch norm eps now: drop the workaround"

    graph = capture_for_quantization(model, (x,), fold_bn=True)
    upstream.move_to_train(graph)
    upstream.move_to_eval(graph)
    assert settings(graph) == [(0.05, 1e-3)]
    with torch.no_grad():
        assert torch.allclose(graph(x), model(x), atol=1e-5)


def test_torchao_train_switch_rewrites_dropout_rates_and_edgeq_keeps_them():
    """torchao writes p=0.5 into every dropout it switches; when this starts failing on the
    first assertion, torchao keeps rates itself and edgeq.upstream.move_to_train can go."""
    import torch
    from torchao.quantization.pt2e import move_exported_model_to_train

    from edgeq.capture import capture

    model = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Dropout(0.0)).eval()
    x = torch.ones(64, 256)

    def dropouts(graph):
        return [n.args[1:] for n in graph.graph.nodes if n.target is torch.ops.aten.dropout.default]

    plain = capture(model, (x[:1],))
    assert dropouts(plain) == [(0.1, False), (0.0, False)]
    move_exported_model_to_train(plain)
    assert dropouts(plain) == [(0.5, True), (0.5, True)], "torchao keeps dropout rates now: drop the workaround"

    graph = capture(model, (x[:1],))
    upstream.move_to_train(graph)
    assert dropouts(graph) == [(0.1, True), (0.0, True)]
    with torch.no_grad():
        zeros = float((graph(x) == 0).float().mean())
    assert 0.07 < zeros < 0.13, f"training mode dropped {zeros:.0%} of the input, not the model's 10%"
    upstream.move_to_eval(graph)
    assert dropouts(graph) == [(0.1, False), (0.0, False)]
    with torch.no_grad():
        assert torch.equal(graph(x), x)


def test_xnnpack_cat_annotator_still_ignores_its_filter_and_edgeq_makes_it_honour_it():
    """The concatenation annotator is registered under "cat" and still ignores filter_fn upstream
    (when it stops ignoring it, edgeq's cat_honours_filter can go)."""
    import torch
    from executorch.backends.xnnpack.quantizer import xnnpack_quantizer_utils as utils
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    class Two(torch.nn.Module):
        def forward(self, a, b):
            return torch.cat([a, b], 1), torch.cat([b, a], 1)

    def graph():
        return torch.export.export(Two(), (torch.randn(1, 2), torch.randn(1, 2))).module()

    registered = utils.OP_TO_ANNOTATOR["cat"]
    config = get_symmetric_quantization_config()
    key = "quantization_annotation"
    first_only = lambda n: n.name == "cat"  # noqa: E731
    gm = graph()
    utils.OP_TO_ANNOTATOR["cat"](gm, config, first_only)
    assert {n.name for n in gm.graph.nodes if key in n.meta} == {"cat", "cat_1"}, "upstream now honours filter_fn"
    gm = graph()
    with upstream.cat_honours_filter():
        utils.OP_TO_ANNOTATOR["cat"](gm, config, first_only)
    assert {n.name for n in gm.graph.nodes if key in n.meta} == {"cat"}
    assert utils.OP_TO_ANNOTATOR["cat"] is registered


def test_qnn_layout_pass_still_misses_a_channel_softmax_and_edgeq_counts_it_sensitive():
    """Upstream's traversal asks is_layout_sensitive, which does not know a softmax over channels
    (only the pass's start list does); edgeq's qnn_channel_softmax_layout makes it answer yes.
    When this first assert fails, upstream fixed it and the patch can go."""
    import torch
    from executorch.backends.qualcomm._passes.layout_transform import LayoutTransform
    from executorch.exir.dialects._ops import ops as exir_ops

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(1, 10, 4, 4)
    over_channels = graph.call_function(exir_ops.edge.aten._softmax.default, (x, 1, False))
    over_last = graph.call_function(exir_ops.edge.aten._softmax.default, (x, -1, False))
    for node in (over_channels, over_last):
        node.meta["val"] = torch.empty(1, 10, 4, 4)
    upstream.qnn_channel_softmax_layout()
    layout = LayoutTransform(None)
    assert not LayoutTransform.is_layout_sensitive.__wrapped__(layout, over_channels)
    assert layout.is_layout_sensitive(over_channels)
    assert not layout.is_layout_sensitive(over_last)  # QNN's own axis: stays where it is


def test_qnn_concat_observer_shares_its_range_except_with_a_softmax():
    """QNN's ConcatObserver writes the concatenation's range into its inputs' observers; with
    concat_keeps_softmax_encoding a softmax's observer keeps its own (non-negative) range."""
    import torch
    from torch import nn

    from edgeq.backends import get_backend, load_target
    from edgeq.capture import capture_for_quantization
    from edgeq.planning.plan import uniform_plan
    from edgeq.quant.convert import prepare
    from edgeq.quant.spec import quant_spec

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.box, self.cls = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 6, 1)

        def forward(self, x):
            return torch.cat((self.box(x), self.cls(x).softmax(1)), 1)

    torch.manual_seed(0)
    model, x = Head().eval(), torch.randn(2, 4, 5, 5)
    target = load_target("qualcomm-sm8650")
    get_backend("qnn")  # registers the backend's quantizer
    plan = uniform_plan(model, target, example_inputs=(x[:1],))
    prepared = prepare(capture_for_quantization(model, (x[:1],), False), quant_spec(plan, target, qat=False))
    prepared(x)
    prepared(x)
    softmax = next(n for n in prepared.graph.nodes if "softmax" in str(n.target))
    cat = next(n for n in prepared.graph.nodes if str(n.target) == "aten.cat.default")
    observer = getattr(prepared, next(iter(softmax.users)).name)
    concat = getattr(prepared, next(iter(cat.users)).name)
    assert float(concat.min_val) < 0  # the box offsets are signed
    assert float(observer.min_val) >= 0 and float(observer.max_val) <= 1


def test_torchao_prepare_still_drops_the_channel_axis_of_a_fake_quant():
    """torchao passes a spec's ch_axis only to classes named "PerChannel..."; edgeq's
    upstream.honour_channel_axes puts it back. When this fails, torchao passes it on and
    honour_channel_axes has nothing left to do."""
    import torch
    from torchao.quantization.pt2e.prepare import _create_obs_or_fq_from_qspec
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    from edgeq.quant.fake_quant import AdaptiveRangeFakeQuantize

    spec = QuantizationSpec(
        dtype=torch.int8,
        quant_min=-127,
        quant_max=127,
        qscheme=torch.per_channel_symmetric,
        ch_axis=1,
        observer_or_fake_quant_ctr=AdaptiveRangeFakeQuantize.with_args(),
    )
    assert _create_obs_or_fq_from_qspec(spec, {}, True).ch_axis == 0


def test_qnn_still_never_requantizes_a_sigmoid():
    """QNN's AnnotateQuantAttrs skips the requantize after a sigmoid whatever its consumer's dtype;
    upstream.requantize_sigmoid_across_dtypes records it where the dtypes differ. When this fails,
    upstream changed the rule: re-check that patch."""
    from executorch.backends.qualcomm._passes.annotate_quant_attrs import AnnotateQuantAttrs
    from executorch.exir.dialects._ops import ops as exir_ops

    assert exir_ops.edge.aten.sigmoid.default in AnnotateQuantAttrs(None).skip_requant_allowlist


def test_the_qnn_llm_model_still_loads_without_its_package_and_takes_what_edgeq_passes():
    """edgeq imports ExecuTorch's QNN static Llama without its package __init__ (which needs a torchtune
    that cannot import beside torchao 0.18); the constructor and forward edgeq.llm.htp calls stay as written."""
    import sys

    static_llama = upstream.qnn_static_llama()
    assert static_llama.__name__ in sys.modules
    init = tuple(inspect.signature(static_llama.LlamaModel.__init__).parameters)
    assert init[:5] == ("self", "config", "ar_len", "output_new_cache_only", "output_cache")
    forward = tuple(inspect.signature(static_llama.LlamaModel.forward).parameters)
    assert forward == ("self", "tokens", "atten_mask", "input_pos", "args")
