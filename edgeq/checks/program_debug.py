"""Per-layer numbers of the lowered program, read back with ExecuTorch's devtools.

The shipped program runs its whole graph inside one XNNPACK delegate call, and
a delegate's intermediate tensors never reach ETDump. So the converted
reference is lowered a second time with the partitioner in per-op mode: the
same XNNPACK kernels and the same integer tensors between them, but every
layer is its own delegate call, whose inputs and outputs ETDump records. The
ETRecord ties each call to the graph nodes (and module names) it came from;
the Inspector reads ETDump, debug buffer and ETRecord back together.

Each layer's program output is then compared three ways: with the
reference's own ops for that delegate call run in PyTorch on the inputs the
program gave the call (the kernels judged alone: a runtime that does not
compute what convert promised shows here, at the layer where it happens);
with the quantized reference run end to end (small differences accumulate);
and with the float model at the same module and op (how far quantization took
it: a bad range or a too narrow precision shows here).
"""

from __future__ import annotations

import math
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeq import upstream
from edgeq.backends import backend_of, load_target
from edgeq.checks.debug import record_values
from edgeq.checks.evaluate import sqnr_db
from edgeq.errors import EdgeqError
from edgeq.graph import is_follower, layer_owners, module_path
from edgeq.lower import untied
from edgeq.planning.plan import quantizable_layers
from edgeq.recipe import as_tuple
from edgeq.targets import Target

_QDQ = ("quantize_per_tensor", "quantize_per_token", "quantize_per_channel")  # and their dequantize_ ops
# Ops that move or relabel values without arithmetic: their output repeats their input's numbers.
_LAYOUT = {"view_copy", "squeeze_copy", "unsqueeze_copy", "permute_copy", "clone", "expand_copy", "_clone_dim_order"}


@dataclass
class ProgramLayer:
    #: the planned layer the delegate call computes, else its module path, else its op
    name: str
    ops: list[str]
    #: the call's output against the reference's ops run on the call's own inputs (the
    #: kernels alone, free of what earlier layers left): SQNR, share of integers that
    #: differ, and by how many grid steps at most
    kernel_vs_reference_db: float
    mismatch: float
    max_steps: int
    #: the output against the quantized reference run end to end (differences accumulate)
    program_vs_reference_db: float
    program_vs_float_db: float | None
    reference_vs_float_db: float | None


@dataclass
class ProgramDebug:
    layers: list[ProgramLayer]
    #: first layer whose program output falls below the threshold against float
    first_vs_float: str | None
    #: first layer whose kernels leave the quantized reference (same inputs)
    first_vs_reference: str | None
    threshold_db: float
    runtime_threshold_db: float
    samples: int
    #: max |difference| between the per-layer program's outputs and the shipped model.pte's
    shipped_max_diff: float | None
    #: ops the partitioner left outside XNNPACK: their outputs are not compared
    outside_ops: list[str] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        for layer in data["layers"]:
            for key, value in layer.items():
                if isinstance(value, float) and math.isinf(value):
                    layer[key] = "inf"
        return data


def _contiguous(inputs: tuple) -> tuple:
    # A batch sliced from a [N, 1, H, W] tensor can carry strides that
    # ExecuTorch reads as channels-last; the program wants the standard layout.
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in inputs)


def debug_samples(recipe, samples: int) -> tuple:
    """The first ``samples`` evaluation inputs, concatenated across batches."""
    chunks, seen = [], 0
    for inputs, _ in recipe.eval_data():
        chunks.append(as_tuple(inputs))
        seen += chunks[-1][0].shape[0]
        if seen >= samples:
            break
    if not chunks:
        raise EdgeqError(
            "eval_data() yielded no batches", "make the recipe's eval_data() yield (inputs, target) batches"
        )
    return _contiguous(tuple(torch.cat([c[i] for c in chunks])[:samples] for i in range(len(chunks[0]))))


def _is_qdq(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and any(k in str(node.target) for k in _QDQ)


def _producer(node: torch.fx.Node) -> torch.fx.Node:
    """The node that computed a value, looking through quantize/dequantize."""
    while _is_qdq(node) and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def _module(node: torch.fx.Node) -> str | None:
    stack = [module_path(path) for path, _ in node.meta.get("nn_module_stack", {}).values()]
    return stack[-1] if stack and stack[-1] else None


def _label(node: torch.fx.Node, owners: dict[torch.fx.Node, str]) -> str | None:
    """Name a value by the planned layer that owns it (an activation quantized on its own
    belongs to the layer before it), else by its innermost module."""
    if node.op == "placeholder":
        return "input"
    if node in owners:
        return owners[node]
    if is_follower(node) and node.args and isinstance(node.args[0], torch.fx.Node):
        before = _producer(node.args[0])
        if before in owners:
            return owners[before]
    return _module(node)


_KINDS = {
    "conv2d": "conv",
    "convolution": "conv",
    "conv1d": "conv",
    "adaptive_avg_pool2d": "mean",
    "avg_pool2d": "avg_pool2d",
    "relu_": "relu",
    "hardtanh_": "hardtanh",
    "add_": "add",
}


def _kind(node: torch.fx.Node) -> str:
    """An op's name, the same in the float ATen graph and the lowered edge graph."""
    name = _op_name(node)
    name = name[:-5] if name.endswith("_copy") else name
    return _KINDS.get(name, name)


def _float_values(graph: torch.fx.GraphModule, inputs: tuple) -> dict[tuple, torch.Tensor]:
    """Float values keyed by (module path, op kind): the same place in both graphs."""
    values = record_values(graph, inputs)
    keyed: dict[tuple, torch.Tensor] = {}
    for node in graph.graph.nodes:
        if node.name not in values:
            continue
        if node.op == "placeholder":
            keyed.setdefault(("input", "input"), values[node.name])
        elif node.op == "call_function":
            keyed[(_module(node), _kind(node))] = values[node.name]
    return keyed


def _where(node: torch.fx.Node) -> tuple:
    return ("input", "input") if node.op == "placeholder" else (_module(node), _kind(node))


def _integers_differ(a: torch.Tensor, b: torch.Tensor, step: float | None) -> tuple[float, int]:
    if step is not None:
        diff = (a.to(torch.int32) - b.to(torch.int32)).abs()
        return float((diff > 0).float().mean()), int(diff.max()) if diff.numel() else 0
    diff = (a.float() - b.float()).abs()
    return float((diff > 1e-6 * b.float().abs().max().clamp(min=1)).float().mean()), 0


def _dequantize(node: torch.fx.Node, value: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """A delegate output in real units; also its grid step where it is an integer tensor."""
    if (
        node.op == "call_function"
        and "quantize_per_tensor" in str(node.target)
        and "dequantize" not in str(node.target)
    ):
        scale, zero_point = float(node.args[1]), int(node.args[2])  # type: ignore[arg-type]
        return (value.to(torch.int32) - zero_point).float() * scale, scale
    return value.float(), None


def _op_name(node: torch.fx.Node) -> str:
    # "aten.convolution.default" (edge ops), "relu.default" (ATen ops) -> the op's name
    parts = getattr(node.target, "__name__", str(node.target)).split(".")
    return parts[1] if len(parts) == 3 else parts[0]


def _lower_per_op(reference: torch.nn.Module, inputs: tuple, target: Target) -> tuple[Any, Any, Any]:
    from executorch.exir import to_edge_transform_and_lower

    backend = backend_of(target)
    partitioners = backend.per_op_partitioners(target)
    if any(t.dtype == torch.float16 for t in (*reference.parameters(), *reference.buffers())):
        # ExecuTorch 1.5.1's ETDump logs no float16 tensor ("ScalarType = 5 is not yet supported in
        # ETDump"), and its Inspector then fails to read the dump at all.
        raise EdgeqError(
            "reading a program's intermediate outputs is not available for plans with fp16 layers "
            "(ExecuTorch's ETDump does not log float16 tensors)",
            "use `edgeq debug --reference-only` to compare the quantized reference with float layer by layer",
        )
    if partitioners is None:
        raise EdgeqError(
            f"reading a program's intermediate outputs is not available for {backend.title} programs",
            "use `edgeq debug --reference-only` to compare the quantized reference with float layer by layer",
        )
    upstream.apply()
    # Untied as lower() does, so the layers are model.pte's.
    exported = torch.export.export(untied(reference), inputs)
    edge = to_edge_transform_and_lower(exported, partitioner=partitioners, generate_etrecord=True)
    program = edge.to_executorch()
    etrecord = program.get_etrecord()
    etrecord.update_representative_inputs([inputs])
    return edge, program, etrecord


def _debug_buffer_size(graph: torch.fx.GraphModule) -> int:
    # Every delegate call logs its inputs and outputs; all of them fit in twice
    # the bytes of every value in the top-level graph.
    total = 0
    for node in graph.graph.nodes:
        val = node.meta.get("val")
        values = val if isinstance(val, (tuple, list)) else [val]
        total += sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
    return 2 * total + (1 << 20)


@dataclass(frozen=True)
class Thresholds:
    """Where a layer counts as the first to diverge: against float, and kernel against reference."""

    float_db: float = 20.0
    runtime_db: float = 30.0


def debug_program(
    float_model: torch.nn.Module,
    reference: torch.nn.Module,
    recipe,
    target: Target | str = "android",
    shipped: str | Path | bytes | None = None,
    out_dir: str | Path | None = None,
    samples: int = 16,
    thresholds: Thresholds = Thresholds(),
) -> ProgramDebug:
    """Run the reference, lowered layer by layer, with ETDump; compare each layer with reference and float.

    ``out_dir`` keeps the debug program, ETRecord, ETDump and debug buffer, so
    they can be opened again with ``executorch.devtools.Inspector``.
    """
    inputs = debug_samples(recipe, samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lowering and ETRecord parsing warn about every unsupported kwarg
        lowered = _lower_per_op(reference, inputs, load_target(target))
        run = _run_with_etdump(lowered, inputs, out_dir)
        rows = _program_rows(float_model, recipe, lowered, run, inputs)
    shipped_diff = None
    if shipped is not None:
        from edgeq.runtime import ProgramRunner

        shipped_out = ProgramRunner(shipped)(*inputs)
        shipped_diff = float((shipped_out.float() - run.outputs[0].float()).abs().max())
    first_float = next(
        (r.name for r in rows if r.program_vs_float_db is not None and r.program_vs_float_db < thresholds.float_db),
        None,
    )
    first_ref = next((r.name for r in rows if r.kernel_vs_reference_db < thresholds.runtime_db), None)
    return ProgramDebug(
        layers=rows,
        first_vs_float=first_float,
        first_vs_reference=first_ref,
        threshold_db=thresholds.float_db,
        runtime_threshold_db=thresholds.runtime_db,
        samples=int(inputs[0].shape[0]),
        shipped_max_diff=shipped_diff,
        outside_ops=run.outside,
        artifacts=run.artifacts,
    )


@dataclass
class _EtdumpRun:
    outputs: list
    #: (delegate call node, its ETDump event), in execution order
    calls: list
    outside: list[str]
    artifacts: dict[str, str]


def _run_with_etdump(lowered: tuple, inputs: tuple, out_dir: str | Path | None) -> _EtdumpRun:
    """Run the per-op program with ETDump and the debug buffer; pair each delegate call with its event."""
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    edge, program, etrecord = lowered
    top = edge.exported_program().graph_module
    calls = [n for n in top.graph.nodes if n.op == "call_function" and "call_delegate" in str(n.target)]
    outside = sorted(
        {
            _op_name(n)
            for n in top.graph.nodes
            if n.op == "call_function" and n not in calls and "getitem" not in str(n.target)
        }
    )
    with tempfile.TemporaryDirectory(prefix="edgeq-debug-") as tmp:
        work = Path(out_dir) if out_dir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        paths = {name: work / name for name in ("model.debug.pte", "etrecord.bin", "etdump.etdp", "debug_buffer.bin")}
        paths["model.debug.pte"].write_bytes(program.buffer)
        etrecord.save(str(paths["etrecord.bin"]))
        loaded = Runtime.get().load_program(
            program.buffer, enable_etdump=True, debug_buffer_size=_debug_buffer_size(top)
        )
        outputs = loaded.load_method("forward").execute(inputs)
        loaded.write_etdump_result_to_file(str(paths["etdump.etdp"]), str(paths["debug_buffer.bin"]))
        inspector = Inspector(
            etdump_path=str(paths["etdump.etdp"]),
            etrecord=str(paths["etrecord.bin"]),
            debug_buffer_path=str(paths["debug_buffer.bin"]),
        )
        events = [
            e
            for block in inspector.event_blocks
            if block.name == "Execute"
            for e in block.events
            if e.name == "DELEGATE_CALL"
        ]
        artifacts = {name: str(path) for name, path in paths.items()} if out_dir is not None else {}
    if len(events) != len(calls):
        raise EdgeqError(
            f"ETDump holds {len(events)} delegate calls, the program has {len(calls)}",
            "report this with the build directory: the debug program and its ETDump disagree",
        )
    return _EtdumpRun(list(outputs), list(zip(calls, events)), outside, artifacts)


def _program_rows(float_model, recipe, lowered: tuple, run: _EtdumpRun, inputs: tuple) -> list[ProgramLayer]:
    """One row per delegate call that computes: the program's output beside the reference's and float's."""
    from edgeq.capture import capture, fold_batchnorm

    edge, _, etrecord = lowered
    top = edge.exported_program().graph_module
    # The reference, in the edge dialect the program was lowered from: same node names.
    edge_graph = etrecord.edge_dialect_program.module()
    reference_values = record_values(edge_graph, inputs)
    layers = [layer.name for layer in quantizable_layers(float_model, recipe.example_inputs())]
    owners = layer_owners(edge_graph, layers)
    by_name = {n.name: n for n in edge_graph.graph.nodes}
    float_graph = capture(float_model.eval(), inputs)
    if not any("batch_norm" in str(n.target) for n in edge_graph.graph.nodes):
        # The build folded BatchNorm into the convs before QAT: compare the
        # float model at the same places, after the (exact) fold.
        fold_batchnorm(float_graph)
    float_values = _float_values(float_graph, inputs)
    context = (by_name, reference_values, owners, float_values)
    rows: list[ProgramLayer] = []
    for call, event in run.calls:
        rows.extend(_call_rows(getattr(top, call.args[0].target).original_module, event, context))
    return rows


def _call_rows(partition, event, context: tuple) -> list[ProgramLayer]:
    by_name, reference_values, owners, float_values = context
    sub = partition.graph_module.graph
    computes = [n for n in sub.nodes if n.op == "call_function" and not _is_qdq(n)]
    outs = list(next(n for n in sub.nodes if n.op == "output").args[0])
    user_inputs = [spec.arg.name for spec in partition.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    recorded = list(event.debug_data)
    call_inputs, out_values = recorded[: len(user_inputs)], recorded[-len(outs) :]
    consumes_input = any(name in by_name and by_name[name].op == "placeholder" for name in user_inputs)
    if not consumes_input and all(_op_name(n) in _LAYOUT for n in computes):
        return []  # a bare quantize/dequantize or reshape between layers adds no numbers of its own
    # The reference's ops for this call, on the inputs the program gave it.
    local = partition.module()(*call_inputs)
    local = list(local) if isinstance(local, (tuple, list)) else [local]
    rows = []
    for out, value, expected in zip(outs, out_values, local):
        node = by_name.get(out.name)
        if node is None or out.name not in reference_values:
            continue
        producer = _producer(node)
        name = _label(producer, owners) or (_op_name(computes[-1]) if computes else out.name)
        program_real, step = _dequantize(node, value)
        local_real, _ = _dequantize(node, expected)
        reference_real, _ = _dequantize(node, reference_values[out.name])
        mismatch, max_steps = _integers_differ(value, expected, step)
        flt = float_values.get(_where(producer))
        if flt is not None and tuple(flt.shape) != tuple(program_real.shape):
            flt = None
        rows.append(
            ProgramLayer(
                name=name,
                ops=[_op_name(n) for n in computes] or ["quantize"],
                kernel_vs_reference_db=sqnr_db(local_real, program_real),
                mismatch=mismatch,
                max_steps=max_steps,
                program_vs_reference_db=sqnr_db(reference_real, program_real),
                program_vs_float_db=sqnr_db(flt, program_real) if flt is not None else None,
                reference_vs_float_db=sqnr_db(flt, reference_real) if flt is not None else None,
            )
        )
    return rows
