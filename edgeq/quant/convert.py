"""PT2E prepare and convert: float graph -> fake-quant graph -> quantized reference (q/dq ops on floats)."""

from __future__ import annotations

from typing import Any

import torch

from edgeq import upstream


def prepare(graph: torch.fx.GraphModule, quantizer: Any, qat: bool = True) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    upstream.apply()
    return prepare_qat_pt2e(graph, quantizer) if qat else prepare_pt2e(graph, quantizer)


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The quantized reference: what the program computes, in float q/dq form."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    upstream.apply()
    rebind_annotations(prepared)
    return convert_pt2e(prepared)


def rebind_annotations(graph: torch.fx.GraphModule) -> int:
    """Point each node's quantization annotation at this graph's nodes; returns how many keys moved.

    A deep copy of a prepared graph (edgeq converts copies, to keep training
    the original) keeps annotations whose input keys are the original graph's
    nodes. convert_pt2e's PortNodeMetaForQDQ looks for a dynamically quantized
    input's choose_qparams among the users of that key, finds none in a
    foreign graph, and fails ("No chose qparams node found"); static inputs
    only lose their metadata. Keys are matched by node name, which deepcopy keeps.
    """
    from torchao.quantization.pt2e.quantizer.port_metadata_pass import Q_ANNOTATION_KEY

    by_name = {node.name: node for node in graph.graph.nodes}
    moved = 0
    for node in graph.graph.nodes:
        annotation = node.meta.get(Q_ANNOTATION_KEY)
        qspecs = getattr(annotation, "input_qspec_map", None)
        if not qspecs:
            continue
        rebound = {}
        for key, qspec in qspecs.items():
            if key.graph is not graph.graph and key.name in by_name:
                key = by_name[key.name]
                moved += 1
            rebound[key] = qspec
        annotation.input_qspec_map = rebound
    return moved
