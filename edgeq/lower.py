"""Lower a quantized reference to an ExecuTorch program with the target's delegate."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from edgeq import upstream
from edgeq.backends import backend_of
from edgeq.capture import capture
from edgeq.context import BuildContext, FloatBaseline
from edgeq.errors import EdgeqError
from edgeq.graph import untie_shared_constants
from edgeq.targets import Target

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
    edge: Any  # executorch EdgeProgramManager, kept for debugging tools

    def payloads(self) -> dict[str, Any]:
        """Bytes of each delegate call's payload (XNNPACK's packed graph, QNN's HTP context binary)."""
        from executorch.exir.lowered_backend_module import LoweredBackendModule

        graph_module = self.edge.exported_program().graph_module
        sizes = [
            (module.backend_id, len(module.processed_bytes))
            for _, module in graph_module.named_children()
            if isinstance(module, LoweredBackendModule)
        ]
        return {
            "delegate_payload_bytes": sum(size for _, size in sizes),
            "delegate_payloads": [{"backend": backend, "bytes": size} for backend, size in sizes],
        }


def _flops(node: Any) -> int:
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


def _delegation(edge: Any, target: Target, float_graph: torch.fx.GraphModule | None) -> Delegation:
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
    return backend_of(target).outside_reason(op)


def untied(model: torch.nn.Module) -> torch.nn.Module:
    """What is lowered: a quantized graph with each use of a shared weight or bias given its own copy
    (see :func:`edgeq.graph.untie_shared_constants`); a plain module as it is."""
    if not isinstance(model, torch.fx.GraphModule):
        return model
    model = copy.deepcopy(model)
    untie_shared_constants(model)
    return model


def lower_float(model: torch.nn.Module, example_inputs: tuple, target: Target) -> bytes:
    """The float baseline program that sizes are measured against."""
    from executorch.exir import to_edge_transform_and_lower

    upstream.apply()
    exported = torch.export.export(model, example_inputs)
    partitioners = backend_of(target).float_partitioners()
    return bytes(to_edge_transform_and_lower(exported, partitioner=partitioners).to_executorch().buffer)


def lower(
    model: torch.nn.Module,
    example_inputs: tuple,
    target: Target,
    float_graph: torch.fx.GraphModule | None = None,
    allow_download: bool = False,
) -> Lowered:
    """Export at the example shape and lower to an ExecuTorch program."""
    upstream.apply()
    edge = backend_of(target).to_edge(untied(model), example_inputs, target, allow_download)
    delegation = _delegation(edge, target, float_graph)
    program = edge.to_executorch()
    return Lowered(program=bytes(program.buffer), delegation=delegation, edge=edge)


def float_baseline(ctx: BuildContext) -> FloatBaseline:
    """The capture stage: the user's float model, checked, captured and lowered as the size baseline."""
    recipe, stages = ctx.recipe, ctx.stages
    with stages("model"):
        try:
            model = recipe.model()
        except Exception as exc:  # noqa: BLE001 - the user's code: its failure becomes one line naming it
            raise EdgeqError(f"recipe model() raised {type(exc).__name__}: {exc}", "fix the recipe's model()") from exc
        if not isinstance(model, torch.nn.Module):
            raise EdgeqError(f"recipe model() returned {type(model).__name__}", "return a torch.nn.Module")
        model = model.eval()
        example_inputs = recipe.example_inputs()
    with stages("export"):
        # Checks the example inputs and export-ability first, with errors that name the cause.
        graph = capture(model, example_inputs, dynamic_batch=False)
    with stages("lower"):
        program = lower_float(model, example_inputs, ctx.target)
    with torch.no_grad():
        scored = recipe.scored_index(model(*example_inputs))
    return FloatBaseline(
        model, example_inputs, graph, program_bytes=len(program), program=program, scored_output=scored
    )


def lower_reference(ctx: BuildContext, reference: torch.fx.GraphModule, baseline: FloatBaseline) -> Lowered:
    """The lower stage: the shipped reference as an ExecuTorch program (--size-budget: edgeq.planning.budget)."""
    ctx.announce("lower")
    with ctx.stages("lower"):
        return lower(
            reference,
            baseline.example_inputs,
            ctx.target,
            float_graph=baseline.graph,
            allow_download=ctx.config.allow_sdk_download,
        )
