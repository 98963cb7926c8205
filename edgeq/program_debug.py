"""Per-layer numbers of the lowered program, read back with ExecuTorch's devtools.

The shipped program runs its whole graph inside one XNNPACK delegate call, and
a delegate's intermediate tensors never reach ETDump. So the converted
reference is lowered a second time with the partitioner in per-op mode: the
same XNNPACK kernels and the same integer tensors between them, but every
layer is its own delegate call, whose inputs and outputs ETDump records. The
ETRecord ties each call to the graph nodes (and module names) it came from;
the Inspector reads ETDump, debug buffer and ETRecord back together.

Each layer's program output is then compared, on the same samples, with the
quantized reference (same integer grid: how far the kernels are from what
convert promised) and with the float model (how far quantization took it).
"""

from __future__ import annotations

import math
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import EdgeqError
from .evaluate import sqnr_db
from .plan import quantizable_layers
from .quantizer import _clean, layer_owners
from .recipe import as_tuple

_QDQ = ("quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel")
# Ops that move or relabel values without arithmetic: their output repeats their input's numbers.
_LAYOUT = {"view_copy", "squeeze_copy", "unsqueeze_copy", "permute_copy", "clone", "expand_copy", "_clone_dim_order"}


@dataclass
class ProgramLayer:
    #: the planned layer the delegate call computes, else its module path, else its op
    name: str
    ops: list[str]
    #: SQNR (dB) of the program's output against the quantized reference's, same samples
    program_vs_reference_db: float
    #: share of the output's integers that differ from the reference's, and by how many steps at most
    mismatch: float
    max_steps: int
    program_vs_float_db: float | None
    reference_vs_float_db: float | None


@dataclass
class ProgramDebug:
    layers: list[ProgramLayer]
    #: first layer whose program output falls below the threshold against float
    first_vs_float: str | None
    #: first layer where the program leaves the quantized reference
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
        raise EdgeqError("eval_data() yielded no batches", "make the recipe's eval_data() yield (inputs, target) batches")
    return _contiguous(tuple(torch.cat([c[i] for c in chunks])[:samples] for i in range(len(chunks[0]))))


class _Recorder(torch.fx.Interpreter):
    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__(graph)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.values[n.name] = result.detach()
        return result


def _record(graph: torch.fx.GraphModule, inputs: tuple) -> dict[str, torch.Tensor]:
    recorder = _Recorder(graph)
    with torch.no_grad():
        recorder.run(*inputs)
    return recorder.values


def _is_qdq(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and any(k in str(node.target) for k in _QDQ)


def _producer(node: torch.fx.Node) -> torch.fx.Node:
    """The node that computed a value, looking through quantize/dequantize."""
    while _is_qdq(node) and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def _key(node: torch.fx.Node, owners: dict[torch.fx.Node, str]) -> str | None:
    """Name a value by the planned layer that owns it, else by its innermost module."""
    if node.op == "placeholder":
        return "input"
    if node in owners:
        return owners[node]
    stack = [_clean(path) for path, _ in node.meta.get("nn_module_stack", {}).values()]
    return stack[-1] if stack and stack[-1] else None


def _by_key(graph: torch.fx.GraphModule, layers: list[str], values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float model outputs keyed like the program's layers: the last value each key produced."""
    owners = layer_owners(graph, layers)
    keyed: dict[str, torch.Tensor] = {}
    for node in graph.graph.nodes:
        if node.op in ("placeholder", "call_function") and node.name in values:
            key = _key(_producer(node), owners)
            if key is not None:
                keyed[key] = values[node.name]
    return keyed


def _dequantize(node: torch.fx.Node, value: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """A delegate output in real units; also its grid step where it is an integer tensor."""
    if node.op == "call_function" and "quantize_per_tensor" in str(node.target) and "dequantize" not in str(node.target):
        scale, zero_point = float(node.args[1]), int(node.args[2])
        return (value.to(torch.int32) - zero_point).float() * scale, scale
    return value.float(), None


def _op_name(node: torch.fx.Node) -> str:
    # "aten.convolution.default" -> "convolution"
    name = getattr(node.target, "__name__", str(node.target))
    parts = name.split(".")
    return parts[1] if len(parts) == 3 else name


def _lower_per_op(reference: torch.nn.Module, inputs: tuple, backend: str):
    from executorch.exir import to_edge_transform_and_lower

    if backend != "xnnpack":
        raise EdgeqError(
            f"reading a program's intermediate outputs works for XNNPACK programs; this one is lowered to {backend}",
            "use `edgeq debug --reference-only` to compare the quantized reference with float layer by layer",
        )
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    exported = torch.export.export(reference, inputs)
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner(per_op_mode=True)],
                                       generate_etrecord=True)
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


def debug_program(float_model: torch.nn.Module, reference: torch.nn.Module, recipe, backend: str = "xnnpack",
                  shipped: str | Path | bytes | None = None, out_dir: str | Path | None = None,
                  samples: int = 16, threshold_db: float = 20.0, runtime_threshold_db: float = 30.0) -> ProgramDebug:
    """Run the reference, lowered layer by layer, with ETDump; compare each layer with reference and float.

    ``out_dir`` keeps the debug program, ETRecord, ETDump and debug buffer, so
    they can be opened again with ``executorch.devtools.Inspector``.
    """
    inputs = debug_samples(recipe, samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lowering and ETRecord parsing warn about every unsupported kwarg
        return _debug_program(float_model, reference, recipe, backend, inputs, shipped, out_dir,
                              threshold_db, runtime_threshold_db)


def _debug_program(float_model, reference, recipe, backend, inputs, shipped, out_dir,
                   threshold_db, runtime_threshold_db) -> ProgramDebug:
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    from .capture import capture

    edge, program, etrecord = _lower_per_op(reference, inputs, backend)
    top = edge.exported_program().graph_module
    calls = [n for n in top.graph.nodes if n.op == "call_function" and "call_delegate" in str(n.target)]
    outside = sorted({_op_name(n) for n in top.graph.nodes
                      if n.op == "call_function" and n not in calls and "getitem" not in str(n.target)})

    with tempfile.TemporaryDirectory(prefix="edgeq-debug-") as tmp:
        work = Path(out_dir) if out_dir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        paths = {name: work / name for name in ("model.debug.pte", "etrecord.bin", "etdump.etdp", "debug_buffer.bin")}
        paths["model.debug.pte"].write_bytes(program.buffer)
        etrecord.save(str(paths["etrecord.bin"]))
        loaded = Runtime.get().load_program(program.buffer, enable_etdump=True,
                                            debug_buffer_size=_debug_buffer_size(top))
        outputs = loaded.load_method("forward").execute(inputs)
        loaded.write_etdump_result_to_file(str(paths["etdump.etdp"]), str(paths["debug_buffer.bin"]))
        inspector = Inspector(etdump_path=str(paths["etdump.etdp"]), etrecord=str(paths["etrecord.bin"]),
                              debug_buffer_path=str(paths["debug_buffer.bin"]))
        events = [e for block in inspector.event_blocks if block.name == "Execute"
                  for e in block.events if e.name == "DELEGATE_CALL"]
        artifacts = {name: str(path) for name, path in paths.items()} if out_dir is not None else {}

    if len(events) != len(calls):
        raise EdgeqError(f"ETDump holds {len(events)} delegate calls, the program has {len(calls)}",
                         "report this with the build directory: the debug program and its ETDump disagree")

    # The reference, in the edge dialect the program was lowered from: same node names.
    before = etrecord.edge_dialect_program
    edge_graph = before.module()
    reference_values = _record(edge_graph, inputs)
    layers = [name for name, _, _ in quantizable_layers(float_model)]
    owners = layer_owners(edge_graph, layers)
    by_name = {n.name: n for n in edge_graph.graph.nodes}
    float_graph = capture(float_model.eval(), inputs)
    float_values = _by_key(float_graph, layers, _record(float_graph, inputs))

    rows: list[ProgramLayer] = []
    for call, event in zip(calls, events):
        lowered = getattr(top, call.args[0].target)
        sub = lowered.original_module.graph_module.graph
        computes = [n for n in sub.nodes if n.op == "call_function" and not _is_qdq(n)]
        outs = list(next(n for n in sub.nodes if n.op == "output").args[0])
        out_values = list(event.debug_data)[-len(outs):]
        consumes_input = any(n.op == "placeholder" and n.name in by_name and by_name[n.name].op == "placeholder"
                             and not n.name.startswith(("b_", "p_", "c_")) for n in sub.nodes)
        if not consumes_input and all(_op_name(n) in _LAYOUT for n in computes):
            continue  # a bare quantize/dequantize or reshape between layers adds no numbers of its own
        for out, value in zip(outs, out_values):
            node = by_name.get(out.name)
            if node is None or out.name not in reference_values:
                continue
            key = _key(_producer(node), owners)
            name = key or (_op_name(computes[-1]) if computes else out.name)
            program_real, step = _dequantize(node, value)
            reference_real, _ = _dequantize(node, reference_values[out.name])
            if step is not None:
                diff = (value.to(torch.int32) - reference_values[out.name].to(torch.int32)).abs()
                mismatch, max_steps = float((diff > 0).float().mean()), int(diff.max())
            else:
                diff = (program_real - reference_real).abs()
                mismatch, max_steps = float((diff > 1e-6 * reference_real.abs().max().clamp(min=1)).float().mean()), 0
            flt = float_values.get(key) if key is not None else None
            if flt is not None and tuple(flt.shape) != tuple(program_real.shape):
                flt = None
            rows.append(ProgramLayer(
                name=name,
                ops=[_op_name(n) for n in computes] or ["quantize"],
                program_vs_reference_db=sqnr_db(reference_real, program_real),
                mismatch=mismatch,
                max_steps=max_steps,
                program_vs_float_db=sqnr_db(flt, program_real) if flt is not None else None,
                reference_vs_float_db=sqnr_db(flt, reference_real) if flt is not None else None,
            ))

    shipped_diff = None
    if shipped is not None:
        from .validate import ProgramRunner

        shipped_out = ProgramRunner(shipped)(*inputs)
        shipped_diff = float((shipped_out.float() - outputs[0].float()).abs().max())
    first_float = next((r.name for r in rows if r.program_vs_float_db is not None and r.program_vs_float_db < threshold_db), None)
    first_ref = next((r.name for r in rows if r.program_vs_reference_db < runtime_threshold_db), None)
    return ProgramDebug(layers=rows, first_vs_float=first_float, first_vs_reference=first_ref,
                        threshold_db=threshold_db, runtime_threshold_db=runtime_threshold_db,
                        samples=int(inputs[0].shape[0]), shipped_max_diff=shipped_diff,
                        outside_ops=outside, artifacts=artifacts)
