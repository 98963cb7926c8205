"""Per-op numerics of a delegate that dumps its own intermediate tensors (QNN HTP).

ExecuTorch's QNN backend can write every op's output inside the HTP graph to
ETDump's debug buffer (``dump_intermediate_outputs``). edgeq lowers the
quantized reference that way, runs it once on the host (the HTP simulator),
and lets ExecuTorch's Inspector compare each op's program output with the
same op of the float edge graph (``edge_after_transform/forward``, the graph
before quantized ops are lowered, run in PyTorch on the same input). The SQNR
therefore says how far the program is from float at each op, where the
quantization error enters and grows; per-op kernel checks against the
quantized reference need a per-op partition, which QNN's partitioner lacks.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeq.backends import backend_of, load_target
from edgeq.checks.program_debug import debug_samples
from edgeq.errors import EdgeqError
from edgeq.graph import module_path
from edgeq.logs import native_stderr
from edgeq.targets import Target

REFERENCE_GRAPH = "edge_after_transform/forward"


@dataclass
class OpNumerics:
    op: str
    #: the module the op belongs to (nn_module_stack), "" for the model itself
    layer: str
    #: program's output against the float edge graph's, same op, same input
    program_vs_float_db: float


@dataclass
class IntermediateDebug:
    backend: str
    samples: int
    threshold_db: float
    ops: list[OpNumerics] = field(default_factory=list)
    first_below: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for op in data["ops"]:
            if not math.isfinite(op["program_vs_float_db"]):
                op["program_vs_float_db"] = None
        return data


def debug_intermediates(
    reference: torch.nn.Module,
    recipe: Any,
    target: Target | str,
    out_dir: str | Path | None = None,
    threshold_db: float = 20.0,
) -> IntermediateDebug:
    """Lower ``reference`` with intermediate dumps, run one evaluation sample, compare op by op with float."""
    target = load_target(target)
    backend = backend_of(target)
    inputs = debug_samples(recipe, 1)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="edgeq-intermediates-") as tmp:
        warnings.simplefilter("ignore")  # lowering and ETRecord parsing warn about every unsupported kwarg
        edge = backend.to_edge_with_intermediates(reference, inputs, target)
        if edge is None:
            raise EdgeqError(
                f"{backend.title} programs cannot dump their intermediate outputs", "use `edgeq debug --reference-only`"
            )
        return _run(edge, inputs, target, Path(out_dir) if out_dir else Path(tmp), threshold_db)


def _run(edge: Any, inputs: tuple, target: Target, work: Path, threshold_db: float) -> IntermediateDebug:
    from executorch.backends.qualcomm.debugger.qcom_numerical_comparator_sample import QcomSQNRComparator
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    work.mkdir(parents=True, exist_ok=True)
    program = edge.to_executorch()
    etrecord = program.get_etrecord()
    etrecord.update_representative_inputs([inputs])
    paths = {
        name: work / name for name in ("model.intermediates.pte", "etrecord.bin", "etdump.etdp", "debug_buffer.bin")
    }
    paths["model.intermediates.pte"].write_bytes(program.buffer)
    etrecord.save(str(paths["etrecord.bin"]))
    with native_stderr(stdout=True):
        loaded = Runtime.get().load_program(program.buffer, enable_etdump=True, debug_buffer_size=1 << 26)
        loaded.load_method("forward").execute(inputs)
        loaded.write_etdump_result_to_file(str(paths["etdump.etdp"]), str(paths["debug_buffer.bin"]))
        del loaded
    edge_ep = etrecord.graph_map[REFERENCE_GRAPH]
    inspector = Inspector(
        etdump_path=str(paths["etdump.etdp"]),
        debug_buffer_path=str(paths["debug_buffer.bin"]),
        etrecord=str(paths["etrecord.bin"]),
        reference_graph_name=REFERENCE_GRAPH,
    )
    gaps = inspector.calculate_numeric_gap(
        distance=QcomSQNRComparator(edge_ep=edge_ep), reference_graph=REFERENCE_GRAPH
    )
    nodes = {node.name: node for node in edge_ep.graph.nodes}
    result = IntermediateDebug(backend=target.backend, samples=1, threshold_db=threshold_db)
    for _, row in gaps.iterrows():
        name = row["aot_ops"][-1]
        node = nodes.get(name)
        stack = list(node.meta.get("nn_module_stack", {}).values()) if node is not None else []
        layer = module_path(stack[-1][0]) if stack else ""
        result.ops.append(OpNumerics(op=name, layer=layer, program_vs_float_db=float(row["gap"][0])))
    below = [op for op in result.ops if op.program_vs_float_db < threshold_db]
    result.first_below = f"{below[0].layer or '(model)'}: {below[0].op}" if below else None
    return result
