"""Embedding tables quantized per row, run by ExecuTorch's quantized embedding kernels.

No delegate runs a quantized embedding lookup (XNNPACK has no gather), and
PT2E's quantizers leave ``aten.embedding`` in float; yet a text model's token
table is often half its weights. edgeq quantizes planned tables itself:

1. :func:`quantize_tables`, on the graph about to be prepared, rounds each
   planned table to its grid (symmetric, one scale per row) and freezes it,
   so calibration, QAT and every check see exactly what ships, and the rest
   of the model trains around the rounding error;
2. :func:`lower_tables`, on the converted reference, swaps each lookup for
   ``quantized_decomposed::embedding_byte`` (8-bit) or ``embedding_4bit``
   (two values per byte) on the integer table and its scales: the ops that
   ExecuTorch's quantized kernel library (``executorch.kernels.quantized``)
   runs. Both compute the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from edgeq import upstream
from edgeq.graph import attr_tensor, drop_unused_attributes, layer_owners

#: graph.meta key: get_attr target of a quantized table -> (bits, per-row scales)
TABLES = "edgeq_embedding_tables"
#: quantized range per width, as the kernels take it (embedding_4bit insists on [-8, 7])
RANGES = {8: (-128, 127), 4: (-8, 7)}


def is_lookup(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and str(node.target).startswith("aten.embedding.")


def row_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """One symmetric scale per row: absmax over half the integer range (torchao's symmetric rule)."""
    qmin, qmax = RANGES[bits]
    absmax = weight.detach().float().abs().amax(1).clamp(min=2**-12)
    return absmax / ((qmax - qmin) / 2)


def quantize_rows(weight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = RANGES[bits]
    return torch.clamp(torch.round(weight.detach().float() / scales[:, None]), qmin, qmax).to(torch.int8)


def quantize_tables(graph: torch.fx.GraphModule, layer_bits: dict[str, int]) -> dict[str, int]:
    """Round the tables of the planned embedding layers (name -> bits) to their grid, frozen; in place.

    Each table becomes a new frozen parameter (the float model's own is left
    alone). Returns get_attr target -> bits for what changed.
    """
    if not layer_bits:
        return {}
    owners = layer_owners(graph, list(layer_bits))
    tables: dict[str, Any] = dict(graph.meta.get(TABLES, {}))
    done: dict[str, int] = {}
    for node in graph.graph.nodes:
        if not is_lookup(node) or owners.get(node) not in layer_bits:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "get_attr":
            continue
        target = str(source.target)
        if target in tables:
            continue
        bits = layer_bits[owners[node]]
        weight = attr_tensor(graph, target)
        scales = row_scales(weight, bits)
        grid = quantize_rows(weight, scales, bits).float() * scales[:, None]
        module_path, _, attr = target.rpartition(".")
        owner = graph.get_submodule(module_path) if module_path else graph
        setattr(owner, attr, torch.nn.Parameter(grid.to(weight.dtype), requires_grad=False))
        tables[target] = (bits, scales)
        done[target] = bits
    graph.meta[TABLES] = tables
    return done


def pack_4bit(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte as embedding_4bit reads them: (even + 8) << 4 | (odd + 8)."""
    shifted = (q.to(torch.int16) + 8).to(torch.uint8)
    return (shifted[:, 0::2] << 4) | shifted[:, 1::2]


def lower_tables(reference: torch.fx.GraphModule) -> int:
    """Swap each quantized table's lookups for ExecuTorch's quantized embedding ops; returns how many."""
    tables = reference.meta.get(TABLES, {})
    if not tables:
        return 0
    upstream.register_quantized_embedding_ops()
    swapped = 0
    for node in list(reference.graph.nodes):
        if not is_lookup(node) or not isinstance(node.args[0], torch.fx.Node):
            continue
        target = str(node.args[0].target)
        if target not in tables:
            continue
        bits, scales = tables[target]
        weight = attr_tensor(reference, target)
        q = quantize_rows(weight, scales, bits)
        if bits == 4:
            if q.shape[1] % 2:
                raise ValueError(f"a 4-bit embedding table needs an even row length, {target} has {q.shape[1]}")
            q = pack_4bit(q)
            op = torch.ops.quantized_decomposed.embedding_4bit.default
        else:
            op = torch.ops.quantized_decomposed.embedding_byte.default
        stem = target.replace(".", "_")
        reference.register_buffer(f"{stem}_q{bits}", q)
        reference.register_buffer(f"{stem}_scales", scales.float())
        qmin, qmax = RANGES[bits]
        with reference.graph.inserting_before(node):
            q_node = reference.graph.get_attr(f"{stem}_q{bits}")
            s_node = reference.graph.get_attr(f"{stem}_scales")
            lookup = reference.graph.call_function(op, (q_node, s_node, None, qmin, qmax, node.args[1]))
        lookup.meta = dict(node.meta)
        node.replace_all_uses_with(lookup)
        reference.graph.erase_node(node)
        swapped += 1
    drop_unused_attributes(reference)
    return swapped
