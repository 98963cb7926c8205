"""PT2E prepare and convert: float graph -> fake-quant graph -> quantized reference (q/dq ops on floats)."""

from __future__ import annotations

import torch

from edgeq import upstream
from edgeq.graph import drop_unused_attributes
from edgeq.quant.dynamic import per_token_activations
from edgeq.quant.embeddings import lower_tables, quantize_tables
from edgeq.quant.groupwise import insert_fake_quants, lower_groups
from edgeq.quant.half import insert_casts, lower_casts
from edgeq.quant.spec import QuantSpec


def prepare(graph: torch.fx.GraphModule, spec: QuantSpec) -> torch.fx.GraphModule:
    """The fake-quant (``spec.qat``) or observed graph of ``spec``."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    upstream.apply()
    # Planned embedding tables are rounded to their grid before PT2E sees the graph (see quant.embeddings).
    quantize_tables(graph, dict(spec.tables))
    if spec.rewrite is not None:
        spec.rewrite(graph)
    # before anything rewrites them (see upstream.move_to_train)
    rates, norms = upstream.record_dropout_rates(graph), upstream.record_batch_norm_settings(graph)
    prepared = prepare_qat_pt2e(graph, spec.quantizer) if spec.qat else prepare_pt2e(graph, spec.quantizer)
    upstream.honour_channel_axes(prepared)
    insert_fake_quants(prepared, dict(spec.groupwise), spec.ranges)
    insert_casts(prepared, set(spec.half))
    prepared.meta[upstream.DROPOUT_RATES] = rates
    prepared.meta[upstream.BATCH_NORM_SETTINGS] = norms
    return prepared


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The quantized reference: what the program computes, in float q/dq form."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    upstream.apply()
    rebind_annotations(prepared)
    groups = lower_groups(prepared)  # before convert_pt2e, which would take the groupwise fake-quants for its own
    reference = convert_pt2e(prepared)
    per_token_activations(reference)  # the program's dynamic grid (see quant.dynamic)
    lower_tables(reference)
    lower_casts(reference)
    if groups:
        drop_unused_attributes(reference)  # the float weights their integer copies replaced
    return reference


def rebind_annotations(graph: torch.fx.GraphModule) -> int:
    """Point each node's quantization annotation at this graph's nodes; returns how many keys moved.

    A deep copy of a prepared graph (edgeq converts copies, to keep training
    the original) keeps annotations whose input keys are the original graph's
    nodes, and putting a prepared graph in eval mode replaces its dropout
    nodes, leaving keys that name no node at all. convert_pt2e's
    PortNodeMetaForQDQ looks for a dynamically quantized input's
    choose_qparams among the users of that key, finds none, and fails ("No
    chose qparams node found"); static inputs only lose their metadata. Keys
    are matched by node name, which deepcopy keeps; a key whose node is gone
    takes the node's input (behind its fake-quant) that no other key claims.
    """
    from torchao.quantization.pt2e.quantizer.port_metadata_pass import Q_ANNOTATION_KEY

    by_name = {node.name: node for node in graph.graph.nodes}
    moved = 0
    for node in graph.graph.nodes:
        annotation = node.meta.get(Q_ANNOTATION_KEY)
        qspecs = getattr(annotation, "input_qspec_map", None)
        if not qspecs or all(key.graph is graph.graph for key in qspecs):
            continue
        current = [key if key.graph is graph.graph else by_name.get(key.name) for key in qspecs]
        free = [src for src in map(_behind_fake_quants, node.all_input_nodes) if src not in current]
        rebound = {}
        for key, found, qspec in zip(qspecs, current, qspecs.values()):
            if found is None and free:
                found = free.pop(0)
            rebound[found if found is not None else key] = qspec
            moved += found is not None and found is not key
        annotation.input_qspec_map = rebound
    return moved


def _behind_fake_quants(node: torch.fx.Node) -> torch.fx.Node:
    """The tensor a chain of observers/fake-quants (prepare's call_module nodes) starts from."""
    while node.op == "call_module" and "activation_post_process" in str(node.target) and node.args:
        source = node.args[0]
        if not isinstance(source, torch.fx.Node):
            break
        node = source
    return node
