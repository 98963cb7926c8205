"""Layers that run in float16 inside an otherwise float32 (or quantized) program.

A layer planned at a ``float`` precision with 16-bit weights (``fp16`` on the
android menu) keeps float arithmetic at half the bytes. XNNPACK runs a float16
linear or convolution as its own partition (the android menu offers linears
only: ExecuTorch 1.5.1 serializes convolution weights in float32 whatever
their dtype, so a float16 conv saves no bytes); the casts either side of it are
ExecuTorch's dim-order copy ops, run outside the delegate (XNNPACK's partitioner
takes no dtype conversions). edgeq, not PT2E, handles these layers:

1. :func:`insert_casts`, on the prepared graph, casts the layer's input, weight
   and bias to float16 before its op and the result back to float32 after it,
   so QAT trains through the float16 rounding and every check sees it (the
   trained weights stay float32 parameters: the cast is differentiable);
2. :func:`lower_casts`, on the converted reference, replaces each weight's cast
   with a float16 copy of the weight, so that the program stores 2 bytes per
   weight and no float32 copy.

Decoder LLMs are quantized as modules before export (edgeq.llm.export), not
as a PT2E graph: there an ``fp16`` linear is a :class:`HalfLinear`, the same
casts written as a module whose weight already is float16.
"""

from __future__ import annotations

import torch

from edgeq.graph import attr_tensor, drop_unused_attributes, layer_owners


class HalfLinear(torch.nn.Module):
    """``linear`` stored in float16 (2 bytes a weight) and run in float16 between casts of its input and
    output, as XNNPACK runs it; a module (not a subclass of Linear, so no quantizer's filter takes it
    for a float linear) with the weight, bias and widths code reading linears expects."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach().to(torch.float16), requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(torch.float16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(torch.float16), self.weight, self.bias).to(x.dtype)


#: graph.meta key: the layers run in float16
HALF = "edgeq_half"
#: ops a float16 layer may hold
_OPS = (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv1d.default)


def _cast(graph: torch.fx.Graph, node: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
    cast = graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": dtype})
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        cast.meta["val"] = val.to(dtype)
    return cast


def insert_casts(graph: torch.fx.GraphModule, layers: set[str] | list[str]) -> int:
    """Run each listed layer's conv or linear in float16 between casts; returns how many ops."""
    if not layers:
        return 0
    owners = layer_owners(graph, list(layers))
    done = 0
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node.target not in _OPS or owners.get(node) not in layers:
            continue
        args = list(node.args)
        with graph.graph.inserting_before(node):
            for i in range(min(3, len(args))):
                if isinstance(args[i], torch.fx.Node):
                    args[i] = _cast(graph.graph, args[i], torch.float16)
        node.args = tuple(args)
        with graph.graph.inserting_after(node):
            back = _cast(graph.graph, node, torch.float32)
        node.replace_all_uses_with(back, delete_user_cb=lambda user, back=back: user is not back)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            back.meta["val"] = val
            node.meta["val"] = val.to(torch.float16)
        done += 1
    graph.meta[HALF] = sorted(layers)
    graph.recompile()
    return done


def lower_casts(reference: torch.fx.GraphModule) -> int:
    """Replace each float16 cast of a stored weight or bias with a float16 copy of it; returns how many."""
    swapped = 0
    for node in list(reference.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten._to_copy.default:
            continue
        source = node.args[0]
        if node.kwargs.get("dtype") is not torch.float16 or not isinstance(source, torch.fx.Node):
            continue
        if source.op != "get_attr":
            continue
        name = f"{str(source.target).replace('.', '_')}_fp16"
        reference.register_buffer(name, attr_tensor(reference, str(source.target)).detach().to(torch.float16))
        with reference.graph.inserting_before(node):
            stored = reference.graph.get_attr(name)
        stored.meta = dict(node.meta)
        node.replace_all_uses_with(stored)
        reference.graph.erase_node(node)
        swapped += 1
    if swapped:
        drop_unused_attributes(reference)
    return swapped
