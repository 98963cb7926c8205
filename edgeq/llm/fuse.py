"""Sibling projections as one linear: q/k/v, and the feed-forward's gate and up.

The three attention projections read the same normalised input, and so do the
feed-forward's gate (``w1``) and up (``w3``) projections. Lowered as they are,
each is its own XNNPACK linear: its own dynamic quantization of that input,
its own kernel call, and (with zero points, edgeq.llm.zero_points) its own
group sums and offsets linear, for a decode step that reads one token. Stacking
their rows into one linear (as llama.cpp's and vLLM's fused QKV and gate-up
do) computes the same numbers: every precision edgeq lowers quantizes a row
on its own (groups and scales run along the input), so the stacked integers
and scales are the siblings' own, and the outputs are slices of one product.

Two steps: :func:`fuse_projections` restacks the modules after quantization
(siblings with the same precision only), each sibling becoming a slice of the
shared linear; the exported graph then holds that linear once per sibling,
which :func:`merge_duplicates` collapses. On SmolLM2's shapes this halves the
zero-point program's lowering nodes and its per-token linear cost.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

from edgeq.llm.zero_points import ZeroPointLinear
from edgeq.quant.half import HalfLinear

__all__ = ["SIBLINGS", "Slice", "fuse_projections", "merge_duplicates"]

#: the projections of one block that read the same input, by ExecuTorch's transformer names
SIBLINGS = (("attention.wq", "attention.wk", "attention.wv"), ("feed_forward.w1", "feed_forward.w3"))


class Slice(nn.Module):
    """One sibling's outputs: columns ``start:stop`` of the shared linear's."""

    def __init__(self, shared: nn.Module, start: int, stop: int) -> None:
        super().__init__()
        self.shared, self.start, self.stop = shared, start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(x)[..., self.start : self.stop]


def _stack_weights(weights: list[Any]) -> Any:
    """Weights stacked by rows: float tensors, or torchao's quantized tensors (rebuilt from their
    stacked data tensors and shared attributes, the layout their own flattening uses)."""
    first = weights[0]
    names = getattr(first, "tensor_data_names", None)
    if names is None:
        return torch.cat([torch.as_tensor(w).detach() for w in weights])
    for w in weights[1:]:
        for attribute in first.tensor_attribute_names:
            if attribute != "block_size" and getattr(w, attribute) != getattr(first, attribute):
                raise ValueError(f"siblings differ in {attribute}")
        if w.block_size[1:] != first.block_size[1:] or w.block_size[0] != 1:
            raise ValueError("siblings are not quantized row by row alike")
    data = [torch.cat([getattr(w, name) for w in weights]) for name in names]
    return type(first)(*data, *[getattr(first, a) for a in first.tensor_attribute_names])


def _stack(modules: list[nn.Module]) -> nn.Module:
    """One module computing all of ``modules``' outputs side by side."""
    splits = [m for m in modules if isinstance(m, ZeroPointLinear)]
    if splits and len(splits) == len(modules):
        groups = {m.group for m in splits}
        if len(groups) != 1:
            raise ValueError("siblings differ in group size")
        return ZeroPointLinear(_stack([m.main for m in splits]), _stack([m.offsets for m in splits]), groups.pop())
    kinds = {type(m) for m in modules}
    if kinds not in ({nn.Linear}, {HalfLinear}):
        raise ValueError("siblings are not all linears of one kind")
    linears: list[nn.Linear] = modules  # type: ignore[assignment]
    has_bias = {m.bias is not None for m in linears}
    if len(has_bias) != 1:
        raise ValueError("siblings differ in bias")
    stacked = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), bias=has_bias.pop())
    stacked.weight = nn.Parameter(_stack_weights([m.weight for m in linears]), requires_grad=False)
    if stacked.bias is not None:
        stacked.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)  # type: ignore[union-attr]
    return HalfLinear(stacked) if kinds == {HalfLinear} else stacked


def fuse_projections(module: nn.Module, precisions: dict[str, str], layers: int) -> list[str]:
    """Each block's siblings (:data:`SIBLINGS`) of one precision in ``precisions`` (by linear name)
    replaced in place by slices of one stacked linear; returns the stacked groups' first names."""
    fused = []
    for layer in range(layers):
        for group in SIBLINGS:
            names = [f"layers.{layer}.{name}" for name in group]
            if len({precisions.get(name, "float") for name in names}) != 1:
                continue
            siblings = [module.get_submodule(name) for name in names]
            shared = _stack(siblings)
            start = 0
            for name, sibling in zip(names, siblings, strict=True):
                linear = sibling.main if isinstance(sibling, ZeroPointLinear) else sibling
                width = int(torch.as_tensor(linear.weight).shape[0])
                module.set_submodule(name, Slice(shared, start, start + width))
                start += width
            fused.append(names[0])
    return fused


def _pure(node: torch.fx.Node) -> bool:
    """Whether two calls of ``node``'s function on the same arguments are one: aten and custom
    operators that neither write their arguments nor draw random numbers and return tensors
    (not the symbolic integers export names one by one), and tuple indexing."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    value = node.meta.get("val")
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is None or schema.is_mutable:
        return False
    return torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ())


def merge_duplicates(graph_module: torch.fx.GraphModule) -> int:
    """Each pure call (:func:`_pure`) that repeats an earlier one on the same arguments, and each
    repeated read of one attribute, replaced by the first; returns how many were removed. Only
    those two kinds, unlike torch's CSEPass, which would merge the KV cache's in-place updates."""
    graph = graph_module.graph
    seen: dict[Any, torch.fx.Node] = {}
    removed = 0
    for node in list(graph.nodes):
        if node.op == "get_attr":
            key: Any = ("get_attr", node.target)
        elif _pure(node):
            key = (node.target, _key(node.args), _key(node.kwargs))
        else:
            continue
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            removed += 1
    graph.lint()
    graph_module.recompile()
    return removed


def _key(value: Any) -> Any:
    """A hashable stand-in for an argument structure (nodes by identity)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    if isinstance(value, torch.fx.Node):
        return value
    if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device)):
        return (type(value).__name__, repr(value))  # 1, 1.0 and True are different arguments
    if isinstance(value, (torch.layout, torch.memory_format)):
        return str(value)
    return ("id", id(value))
