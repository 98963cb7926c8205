"""PT2E convert: fake-quant graph -> quantized reference (q/dq ops on floats)."""

from __future__ import annotations

import copy
import functools

import torch


@functools.cache
def _pattern_cache_installed() -> bool:
    """Memoise torchao's conv-BN pattern graphs.

    ``prepare_qat_pt2e`` and ``convert_pt2e`` re-export the same small pattern
    functions with torch.export for every conv-BN pair (about 0.3 s each, 96
    times for four pairs in convert); the graphs depend only on the pattern
    and its example inputs' shapes, so one export per key is enough. The
    replacement engine copies the graphs it matches, so sharing is safe.
    """
    from torchao.quantization.pt2e import qat_utils, utils

    original = utils._get_aten_graph_module_for_pattern
    cache: dict = {}

    def key_of(value):
        if isinstance(value, torch.Tensor):
            return ("T", tuple(value.shape), value.dtype, value.device.type)
        if isinstance(value, (tuple, list)):
            return tuple(key_of(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, key_of(v)) for k, v in value.items()))
        return value

    def pattern_key(pattern):
        fn = getattr(pattern, "fn", pattern)  # torchao wraps closures in WrapperModule
        code = getattr(fn, "__code__", None)
        if code is None:
            return pattern
        cells = tuple(key_of(c.cell_contents) for c in (fn.__closure__ or ()))
        return (code, cells)

    @functools.wraps(original)
    def cached(pattern, example_inputs, is_cuda=False, **kwargs):
        key = (pattern_key(pattern), key_of(example_inputs), is_cuda, key_of(kwargs))
        if key not in cache:
            cache[key] = original(pattern, example_inputs, is_cuda, **kwargs)
        # Callers mutate the returned graph (they strip and rewrite nodes).
        return copy.deepcopy(cache[key])

    utils._get_aten_graph_module_for_pattern = cached
    qat_utils._get_aten_graph_module_for_pattern = cached
    try:
        from executorch.backends.xnnpack.quantizer import xnnpack_quantizer_utils as xnn
    except ImportError:
        return True
    xnn._get_aten_graph_module_for_pattern = cached
    annotate_conv_bn = xnn._do_annotate_conv_bn

    @functools.wraps(annotate_conv_bn)
    def skip_without_bn(gm, *args, **kwargs):
        # Matching needs the pattern graphs; a graph with no BatchNorm (edgeq
        # folds it before QAT by default) cannot match, so skip building them.
        if not any("batch_norm" in str(n.target) for n in gm.graph.nodes if n.op == "call_function"):
            return []
        return annotate_conv_bn(gm, *args, **kwargs)

    xnn._do_annotate_conv_bn = skip_without_bn
    return True


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The quantized reference: what the program computes, in float q/dq form."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    _pattern_cache_installed()
    return convert_pt2e(prepared)


def prepare(graph: torch.fx.GraphModule, quantizer, qat: bool = True) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    _pattern_cache_installed()
    return prepare_qat_pt2e(graph, quantizer) if qat else prepare_pt2e(graph, quantizer)
