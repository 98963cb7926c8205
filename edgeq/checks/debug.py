"""Per-layer numeric debugging: where do the quantized numbers leave the float ones?

Runs the float model and the converted PT2E reference (the graph the program
was lowered from) on the same batch, records the output of every planned
layer (its conv/linear op, or the activation fused after it) in both, and
reports SQNR per layer in execution order. The first layer whose SQNR falls
below the threshold is where to look: a bad range, a too-narrow precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgeq.checks.evaluate import sqnr_db
from edgeq.graph import layer_owners
from edgeq.planning.plan import quantizable_layers
from edgeq.recipe import as_tuple


@dataclass
class LayerError:
    layer: str
    sqnr_db: float


def record_values(graph: torch.fx.GraphModule, inputs: tuple, keep: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Run ``graph`` on ``inputs`` and keep every node's tensor output (or only those named in
    ``keep``: every activation of a CNN on an evaluation batch is tens of GB), by node name."""
    values: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if isinstance(result, torch.Tensor) and (keep is None or n.name in keep):
                values[n.name] = result.detach()
            return result

    with torch.no_grad():
        Recorder(graph).run(*inputs)
    return values


def _layer_outputs(graph: torch.fx.GraphModule, layers: list[str], inputs: tuple) -> dict[str, torch.Tensor]:
    owners = layer_owners(graph, layers)
    last: dict[str, torch.fx.Node] = {}
    for node in graph.graph.nodes:  # topological order: the last node of each layer is its output
        if node in owners:
            last[owners[node]] = node
    values = record_values(graph, inputs, keep={node.name for node in last.values()})
    return {layer: values[node.name].float() for layer, node in last.items() if node.name in values}


def layer_errors(
    float_model: torch.nn.Module, reference: torch.fx.GraphModule, example_inputs: tuple, inputs: tuple
) -> list[LayerError]:
    """SQNR of each planned layer's output, reference against float, in execution order."""
    from edgeq.capture import capture

    layers = [layer.name for layer in quantizable_layers(float_model, example_inputs)]
    float_graph = capture(float_model, example_inputs)
    ref = _layer_outputs(reference, layers, inputs)
    flt = _layer_outputs(float_graph, layers, inputs)
    order = [name for name in ref if name in flt]
    return [LayerError(name, sqnr_db(flt[name], ref[name])) for name in order]


def first_divergence(errors: list[LayerError], threshold_db: float) -> LayerError | None:
    return next((e for e in errors if e.sqnr_db < threshold_db), None)


def debug(
    float_model, reference, recipe, threshold_db: float = 20.0, batches: int = 1, source=None
) -> tuple[list[LayerError], LayerError | None]:
    """Per-layer SQNR of ``reference`` against float on the first ``batches`` of ``source``
    ((inputs, target) batches; the evaluation data unless given: a decision passes held-out data)."""
    data = []
    for inputs, _ in source if source is not None else recipe.eval_data():
        data.append(as_tuple(inputs))
        if len(data) >= batches:
            break
    inputs = tuple(torch.cat([d[i] for d in data]) for i in range(len(data[0])))
    errors = layer_errors(float_model.eval(), reference, recipe.example_inputs(), inputs)
    return errors, first_divergence(errors, threshold_db)
