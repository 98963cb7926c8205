"""Output concatenations that mix ranges: find them, and measure whether one int8 scale over them hurts.

A detector's head often ends in ``cat((objectness, box, classes))``: box
values in pixels or raw offsets beside probabilities in 0..1. The CPU
quantizer gives a concatenation one scale shared by its inputs, so the
narrow inputs (the probabilities that rank and threshold every box) get a
few of the 256 levels. For each concatenation on the output tail (only shape
ops or further concatenations between it and the model's output), the
analysis measures each input's range on the calibration batches, and, where
the narrowest input gets fewer than :data:`LEVELS_WANTED` levels, the task
loss with the concatenation quantized with one scale against with one scale
per input (what the program does when the concatenation stays in float and
each branch keeps its own quantized output). The plan keeps it in float
when one scale measurably costs more (``Plan.float_ops``); the report says
which and why. A backend that runs no float op between quantized ones (the
HTP) gives such a concatenation 16-bit activations instead (``Plan.wide_ops``),
where one 16-bit scale measured better than one int8 scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from edgeq.recipe import Recipe, as_tuple

#: below this many int8 levels for the narrowest input, the one-scale question is measured
LEVELS_WANTED = 64
#: shape-only ops a concatenation may pass through on its way to the output
_TAIL_OPS = (
    "aten.view",
    "aten.reshape",
    "aten.permute",
    "aten.flatten",
    "aten.unsqueeze",
    "aten.squeeze",
    "aten.transpose",
    "aten.contiguous",
    "aten.clone",
    "aten.cat",
    "aten.concat",
)


@dataclass
class ConcatAnalysis:
    #: the concatenation's node in the exported graph (plan.json's float_ops names it)
    node: str
    #: each input's (min, max) on the calibration batches
    inputs: list[tuple[float, float]]
    #: int8 levels the narrowest input spans under one scale over the whole concatenation
    narrowest_levels: float
    #: task loss on the analysis batches: float model, one int8 scale, one int8 scale per input, one
    #: 16-bit scale (what a backend without float ops, the HTP, can do instead)
    float_loss: float = 0.0
    one_scale_loss: float = 0.0
    per_input_loss: float = 0.0
    wide_loss: float = 0.0
    #: one int8 scale measurably costs more than one per input: float on a CPU target
    keep_float: bool = False
    #: one int8 scale measurably costs more than one 16-bit scale: 16-bit activations on the HTP
    widen: bool = False
    reason: str = ""
    notes: list[str] = field(default_factory=list)


def _is_cat(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and str(node.target).startswith(("aten.cat", "aten.concat"))


def _on_output_tail(node: torch.fx.Node) -> bool:
    for user in node.users:
        if user.op == "output":
            continue
        if user.op != "call_function" or not str(user.target).startswith(_TAIL_OPS) or not _on_output_tail(user):
            return False
    return True


def output_concats(graph: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in graph.graph.nodes if _is_cat(n) and _on_output_tail(n)]


def _width(lo: float, hi: float) -> float:
    return max(hi, 0.0) - min(lo, 0.0)


def _quantize(x: torch.Tensor, lo: float, hi: float, bits: int = 8) -> torch.Tensor:
    """Per-tensor affine quantization over [lo, hi] widened to hold 0, as the quantizers' observers set it."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    top = 2**bits - 1
    scale = max((hi - lo) / top, 2**-20)
    return torch.fake_quantize_per_tensor_affine(x, scale, int(round(-lo / scale)), 0, top)


class _Run(torch.fx.Interpreter):
    """Runs the exported graph; records concatenation input ranges, or quantizes one concatenation."""

    def __init__(self, graph: torch.fx.GraphModule, watch: list[str]) -> None:
        super().__init__(graph)
        self.watch = set(watch)
        self.ranges: dict[str, list[list[float]]] = {}
        self.quantize: tuple[str, str, list[tuple[float, float]]] | None = None

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name not in self.watch:
            return super().run_node(n)
        tensors, dim = self.fetch_args_kwargs_from_env(n)[0][0], int(n.args[1] if len(n.args) > 1 else 0)  # type: ignore[arg-type]
        seen = self.ranges.setdefault(n.name, [[float("inf"), float("-inf")] for _ in tensors])
        for entry, t in zip(seen, tensors):
            entry[0], entry[1] = min(entry[0], float(t.min())), max(entry[1], float(t.max()))
        if self.quantize is not None and self.quantize[0] == n.name:
            _, mode, ranges = self.quantize
            if mode in ("one", "one16"):
                lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
                return _quantize(torch.cat(tensors, dim), lo, hi, 16 if mode == "one16" else 8)
            return torch.cat([_quantize(t, lo, hi) for t, (lo, hi) in zip(tensors, ranges)], dim)
        return super().run_node(n)


def _loss(run: _Run, recipe: Recipe, data: list) -> float:
    total, seen = 0.0, 0
    with torch.no_grad():
        for inputs, target in data:
            out = recipe.score_output(run.run(*as_tuple(inputs)))
            total += float(recipe.loss(out, target)) * len(out)
            seen += len(out)
    return total / max(seen, 1)


def analyze_concats(model: torch.nn.Module, recipe: Recipe, data: list) -> list[ConcatAnalysis]:
    """The output-tail concatenations of ``model`` measured on ``data`` (calibration batches)."""
    from edgeq.capture import capture

    graph = capture(model, recipe.example_inputs())
    nodes = [n.name for n in output_concats(graph)]
    if not nodes:
        return []
    run = _Run(graph, nodes)
    float_loss = _loss(run, recipe, data)
    found = []
    for name, ranges in run.ranges.items():
        widths = [_width(lo, hi) for lo, hi in ranges]
        total = _width(min(r[0] for r in ranges), max(r[1] for r in ranges))
        levels = 255.0 * min(widths) / total if total > 0 else 255.0
        entry = ConcatAnalysis(name, [(round(lo, 6), round(hi, 6)) for lo, hi in ranges], round(levels, 2))
        entry.float_loss = float_loss
        if levels >= LEVELS_WANTED:
            entry.reason = f"narrowest input spans {levels:.0f} of 255 int8 levels: one scale is fine"
            found.append(entry)
            continue
        fixed = [(float(lo), float(hi)) for lo, hi in ranges]
        run.quantize = (name, "one", fixed)
        entry.one_scale_loss = _loss(run, recipe, data)
        run.quantize = (name, "per-input", fixed)
        entry.per_input_loss = _loss(run, recipe, data)
        run.quantize = (name, "one16", fixed)
        entry.wide_loss = _loss(run, recipe, data)
        run.quantize = None
        # Float (each branch keeps its own scale) only where one shared scale measurably costs
        # more: at least 1% of the float loss above one scale per input.
        margin = 0.01 * abs(float_loss) + 1e-9
        entry.keep_float = entry.one_scale_loss > entry.per_input_loss + margin
        entry.widen = entry.one_scale_loss > entry.wide_loss + margin
        entry.reason = (
            f"narrowest input spans {levels:.1f} of 255 int8 levels; task loss {entry.one_scale_loss:.4g} with one "
            f"int8 scale vs {entry.per_input_loss:.4g} with one per input, {entry.wide_loss:.4g} with one 16-bit "
            f"scale (float {float_loss:.4g}): "
            + (
                "float on CPU targets (each branch quantized on its own), 16-bit on the HTP"
                if entry.keep_float or entry.widen
                else "one scale costs nothing"
            )
        )
        found.append(entry)
    return found
