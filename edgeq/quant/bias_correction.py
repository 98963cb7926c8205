"""Empirical bias correction of a converted (PT2E reference) graph.

Quantizing a layer's weights and inputs shifts the mean of its output
channels; depthwise convolutions, with few weights per channel, shift most,
and the shift adds up through a network (Nagel et al., "Data-Free
Quantization", 2019, section 4.2). The correction measures, on calibration
data, each conv/linear output channel's mean in the float graph and in the
quantized one, and adds the difference to the layer's float bias (XNNPACK
quantizes the bias itself at lowering, on the int32 grid of input scale x
weight scale, so the correction survives into the program).

Layers are corrected in graph order in one pass: each layer's correction is
applied to its output before later layers see it, so every correction is
measured with all the corrections upstream of it in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

__all__ = ["BiasCorrection", "correct_bias"]


@dataclass
class BiasCorrection:
    #: layers corrected, and the largest |shift| of any channel per layer (in output units)
    shifts: dict[str, float]
    samples: int
    #: layers left alone: their bias is quantized in the graph
    skipped: list[str]


def _channel_axis(node: fx.Node, value: torch.Tensor) -> int:
    """A conv's output channels are dim 1, a linear's the last dim."""
    return -1 if str(node.target).startswith("aten.linear.") else 1


def _channel_means(value: torch.Tensor, axis: int) -> torch.Tensor:
    return value.float().movedim(axis, -1).reshape(-1, value.shape[axis]).mean(0)


#: ops whose third argument is a bias
_BIASED = ("aten.conv1d.", "aten.conv2d.", "aten.convolution.", "aten.linear.")


def _layer_nodes(graph: fx.GraphModule) -> list[fx.Node]:
    return [n for n in graph.graph.nodes if n.op == "call_function" and str(n.target).startswith(_BIASED)]


class _FloatMeans(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, names: set[str]) -> None:
        super().__init__(module)
        self.names = names
        self.means: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names:
            self.means[n.name] = _channel_means(out, _channel_axis(n, out))
        return out


def _bias_of(node: fx.Node) -> object:
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def correctable(node: fx.Node) -> bool:
    """A float constant bias (or none): a bias the quantizer quantized itself (QNN's int32
    biases) sits behind a dequantize op, and correcting it would need its integer grid."""
    bias = _bias_of(node)
    return bias is None or (isinstance(bias, fx.Node) and bias.op == "get_attr")


class _Correct(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, float_means: dict[str, torch.Tensor]) -> None:
        super().__init__(module)
        self.float_means = float_means
        self.shifts: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        target = self.float_means.get(n.name) if correctable(n) else None
        if target is not None and isinstance(out, torch.Tensor):
            axis = _channel_axis(n, out)
            shift = target - _channel_means(out, axis)
            self.shifts[n.name] = shift
            shape = [1] * out.dim()
            shape[axis] = -1
            out = out + shift.view(shape).to(out.dtype)
        return out


def _add_to_bias(graph: fx.GraphModule, node: fx.Node, shift: torch.Tensor) -> None:
    """Add ``shift`` to the float bias argument of a conv/linear node (creating one where it has none)."""
    bias = _bias_of(node)
    if isinstance(bias, fx.Node) and bias.op == "get_attr":
        name = str(bias.target)
        holder = graph.get_parameter(name) if _is_param(graph, name) else graph.get_buffer(name)
        with torch.no_grad():
            holder.add_(shift.to(holder.dtype))
        return
    assert bias is None, f"{node.name}: only constant biases are corrected"
    name = f"_edgeq_bias_correction_{node.name}"
    graph.register_buffer(name, shift.detach().clone().float())
    with graph.graph.inserting_before(node):
        attr = graph.graph.get_attr(name)
    args = list(node.args)
    while len(args) < 3:
        args.append(None)
    args[2] = attr
    node.args = tuple(args)


def _is_param(graph: fx.GraphModule, target: str) -> bool:
    try:
        graph.get_parameter(target)
        return True
    except AttributeError:
        return False


@torch.no_grad()
def correct_bias(
    reference: fx.GraphModule, float_graph: fx.GraphModule, inputs: tuple[torch.Tensor, ...]
) -> BiasCorrection:
    """Correct ``reference``'s conv/linear biases in place against ``float_graph`` on ``inputs``.

    ``float_graph`` is the float model captured as the reference was (BatchNorm folded the same
    way), so the two graphs name their layers alike; ``inputs`` is one batch of calibration data.
    """
    quant_layers = {n.name: n for n in _layer_nodes(reference)}
    float_layers = {n.name: n for n in _layer_nodes(float_graph)}
    names = {name for name in quant_layers if name in float_layers}
    floats = _FloatMeans(float_graph, names)
    floats.run(*inputs)
    corrector = _Correct(reference, floats.means)
    corrector.run(*inputs)
    shifts: dict[str, float] = {}
    for name, shift in corrector.shifts.items():
        _add_to_bias(reference, quant_layers[name], shift)
        shifts[name] = float(shift.abs().max())
    reference.graph.lint()
    reference.recompile()
    skipped = [name for name in sorted(names) if not correctable(quant_layers[name])]
    return BiasCorrection(shifts=shifts, samples=int(inputs[0].shape[0]) if inputs else 0, skipped=skipped)
