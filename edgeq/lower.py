"""Lower a quantized reference to an ExecuTorch program with the target's delegate."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .targets import Target

# Ops that carry no compute: their presence outside a delegate is bookkeeping.
_BOOKKEEPING = {"getitem", "output", "placeholder"}


@dataclass
class Delegation:
    delegated_ops: int
    outside_ops: int
    delegate_calls: int
    #: op name -> (occurrences inside the delegate, occurrences outside)
    by_op: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: op name -> why the target leaves it outside the delegate
    outside: dict[str, str] = field(default_factory=dict)
    #: share of the model's multiply-accumulates that run inside the delegate
    flops_in_delegate: float = 1.0


@dataclass
class Lowered:
    program: bytes
    delegation: Delegation
    edge: object  # executorch EdgeProgramManager, kept for debugging tools


def _flops(node: torch.fx.Node) -> int:
    """Multiply-accumulates of conv and linear nodes from their tensor metadata."""
    name = str(node.target)
    try:
        out = node.meta["val"]
        if "convolution" in name or "conv2d" in name:
            weight = node.args[1].meta["val"]
            return int(out.numel() * weight[0].numel())
        if "linear" in name or ".mm" in name or "addmm" in name:
            weight = node.args[1].meta["val"]
            return int(out.numel() * weight.shape[-1 if "linear" in name else 0])
    except (KeyError, AttributeError, IndexError, TypeError):
        return 0
    return 0


def _delegation(edge, target: Target, float_graph: torch.fx.GraphModule | None) -> Delegation:
    from executorch.devtools.backend_debug import get_delegation_info

    graph_module = edge.exported_program().graph_module
    info = get_delegation_info(graph_module)
    by_op = {}
    for op, counts in info.delegation_by_operator.items():
        by_op[op] = (int(counts.delegated), int(counts.non_delegated))
    outside = {}
    for op, (_, out) in by_op.items():
        if out and op not in _BOOKKEEPING:
            outside[op] = _reason(op, target)
    # Compute share: MACs of conv/linear nodes left in the top-level graph.
    outside_macs = sum(_flops(n) for n in graph_module.graph.nodes if n.op == "call_function")
    total_macs = sum(_flops(n) for n in float_graph.graph.nodes if n.op == "call_function") if float_graph else 0
    share = 1.0 - outside_macs / total_macs if total_macs else (1.0 if not outside else 0.0)
    return Delegation(
        delegated_ops=int(info.num_delegated_nodes),
        outside_ops=sum(out for op, (_, out) in by_op.items() if op not in _BOOKKEEPING),
        delegate_calls=int(info.num_delegated_subgraphs),
        by_op=by_op,
        outside=outside,
        flops_in_delegate=max(0.0, min(1.0, share)),
    )


def _reason(op: str, target: Target) -> str:
    for pattern, why in target.op_limits.items():
        key = pattern.replace("aten.", "aten_").replace(".", "_")
        if op.startswith(key) or op == pattern:
            return why
    return f"the {target.backend} partitioner does not take this op (no delegate kernel for it, or for its dtype/arguments)"


def _skip_idle_bilinear_matching() -> None:
    """Spare XNNPACK's ConvertToUpsampleBilinear2d its pattern graphs where it cannot match.

    The first time the pass runs in a process it exports four interpolate
    models (torch.export + to_edge: 4 s of every build on the CI machine) only
    to match them against the graph. A decomposed bilinear upsample always
    contains index ops and an undecomposed one is an upsample_bilinear2d node;
    a graph with neither has nothing to match, and the pass then only retraces
    it, which it still does here.
    """
    from executorch.backends.xnnpack._passes import convert_to_upsample_bilinear2d as module
    from executorch.backends.xnnpack._passes.xnnpack_pass import XNNPACKPass
    from torch.fx.passes.infra.pass_base import PassResult

    cls = module.ConvertToUpsampleBilinear2d
    if getattr(cls, "_edgeq_skips_idle", False):
        return
    original = cls.call

    def call(self, graph_module: torch.fx.GraphModule):
        names = {str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"}
        if any("upsample_bilinear2d" in name or "index" in name for name in names):
            return original(self, graph_module)
        graph_module.recompile()
        return PassResult(XNNPACKPass.call(self, graph_module).graph_module, True)

    cls.call = call
    cls._edgeq_skips_idle = True


def lower(model: torch.nn.Module, example_inputs: tuple, target: Target,
          float_graph: torch.fx.GraphModule | None = None, allow_download: bool = False) -> Lowered:
    """Export at the example shape and lower to an ExecuTorch program."""
    from executorch.exir import to_edge_transform_and_lower

    exported = torch.export.export(model, example_inputs)
    if target.backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        _skip_idle_bilinear_matching()
        partitioners = [XnnpackPartitioner()]
    else:
        from .qnn import qnn_partitioners

        partitioners = qnn_partitioners(target, allow_download)
    edge = to_edge_transform_and_lower(exported, partitioner=partitioners)
    delegation = _delegation(edge, target, float_graph)
    program = edge.to_executorch()
    return Lowered(program=bytes(program.buffer), delegation=delegation, edge=edge)
