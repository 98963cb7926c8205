"""Linear weights quantized in groups of input channels (one scale per group), trained and shipped.

PT2E's quantizers have no groupwise weight spec, but XNNPACK runs a linear
whose weight comes through ``quantized_decomposed::dequantize_per_channel_group``
(4-bit weights, bf16 scales per group, dynamic 8-bit activations: its qb4w
kernels). edgeq leaves such a layer's weight out of PT2E and:

1. :func:`insert_fake_quants`, on the prepared graph, puts a groupwise
   fake-quant (symmetric, the group's absmax over half the 4-bit range, a
   straight-through gradient) between the weight and the linear, so QAT and
   every check see the grid that ships;
2. :func:`lower_groups`, on the converted reference, replaces that fake-quant
   with the integer weight, its scales and ``dequantize_per_channel_group``,
   computing the same numbers, and drops the float weight from the program.

Scales follow the weights at every step (no range tracking: a group of 32
weights has no outlier batch to be robust to).
"""

from __future__ import annotations

import torch

from edgeq.graph import attr_tensor, drop_unused_attributes, layer_owners

#: graph.meta key: layer name -> (group size, bits) for the layers quantized here
GROUPS = "edgeq_groupwise"
RANGES = {4: (-8, 7)}
#: XNNPACK packs groups of a multiple of this many input channels
GROUP_MULTIPLE = 32


def group_scales(weight: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """[out, in / group] symmetric scales: each group's absmax over half the integer range."""
    qmin, qmax = RANGES[bits]
    out, inp = weight.shape
    absmax = weight.detach().float().reshape(out, inp // group, group).abs().amax(-1).clamp(min=2**-12)
    # bf16, as XNNPACK stores them, so that the reference and the program share one grid
    return (absmax / ((qmax - qmin) / 2)).to(torch.bfloat16).float()


def quantize_groups(weight: torch.Tensor, scales: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    qmin, qmax = RANGES[bits]
    out, inp = weight.shape
    grouped = weight.float().reshape(out, inp // group, group) / scales[..., None]
    return torch.clamp(torch.round(grouped), qmin, qmax).reshape(out, inp)


class _FakeQuantGroups(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, group: int, bits: int) -> torch.Tensor:  # type: ignore[override]
        scales = group_scales(weight, group, bits)
        q = quantize_groups(weight, scales, group, bits)
        out, inp = weight.shape
        return (q.reshape(out, inp // group, group) * scales[..., None]).reshape(out, inp).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None  # straight-through


def fake_quant_groups(weight: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """The weight on its groupwise grid, with a straight-through gradient."""
    return _FakeQuantGroups.apply(weight, group, bits)


def _linears(graph: torch.fx.GraphModule, layers: dict[str, tuple[int, int]]) -> list[tuple[torch.fx.Node, str]]:
    owners = layer_owners(graph, list(layers))
    return [
        (node, owners[node])
        for node in graph.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("aten.linear.") and owners.get(node) in layers
    ]


def insert_fake_quants(graph: torch.fx.GraphModule, layers: dict[str, tuple[int, int]]) -> int:
    """Put the groupwise fake-quant on the weight of each listed layer's linear; returns how many."""
    if not layers:
        return 0
    done = 0
    for node, layer in _linears(graph, layers):
        weight = node.args[1]
        if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
            continue
        group, bits = layers[layer]
        with graph.graph.inserting_before(node):
            fake = graph.graph.call_function(fake_quant_groups, (weight, group, bits))
        fake.meta = dict(weight.meta)
        node.replace_input_with(weight, fake)
        done += 1
    graph.meta[GROUPS] = dict(layers)
    graph.recompile()
    return done


def lower_groups(reference: torch.fx.GraphModule) -> int:
    """Replace each groupwise fake-quant with the integer weight and dequantize_per_channel_group."""
    swapped = 0
    for node in list(reference.graph.nodes):
        if node.op != "call_function" or node.target is not fake_quant_groups:
            continue
        source, group, bits = node.args
        assert isinstance(source, torch.fx.Node)
        target = str(source.target)
        weight = attr_tensor(reference, target)
        scales = group_scales(weight, group, bits)
        q = quantize_groups(weight.detach(), scales, group, bits).to(torch.int8)
        stem = target.replace(".", "_")
        reference.register_buffer(f"{stem}_q{bits}g{group}", q)
        reference.register_buffer(f"{stem}_gscales", scales)
        reference.register_buffer(f"{stem}_gzeros", torch.zeros_like(scales, dtype=torch.int8))
        qmin, qmax = RANGES[bits]
        with reference.graph.inserting_before(node):
            args = [reference.graph.get_attr(f"{stem}_{name}") for name in (f"q{bits}g{group}", "gscales", "gzeros")]
            dequant = reference.graph.call_function(
                torch.ops.quantized_decomposed.dequantize_per_channel_group.default,
                (*args, qmin, qmax, torch.int8, group, torch.float32),
            )
        dequant.meta = dict(node.meta)
        node.replace_all_uses_with(dequant)
        reference.graph.erase_node(node)
        swapped += 1
    if swapped:
        drop_unused_attributes(reference)
    return swapped
