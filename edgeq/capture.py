"""Capture the float model as a graph with torch.export, ready for PT2E.

The batch dimension is exported as dynamic so that calibration, QAT and
evaluation can use any batch size; the shipped program is exported again at
the recipe's example shape. Capture failures are turned into one-line errors
that point at the user's source line.
"""

from __future__ import annotations

import copy
import re
import traceback
from typing import Any

import torch
from torch import nn

from edgeq.errors import EdgeqError
from edgeq.graph import MAGNITUDES


def _check_inputs(model: nn.Module, example_inputs: tuple) -> None:
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise EdgeqError(
            f"example_inputs() returned {type(example_inputs).__name__}",
            "return a non-empty tuple of tensors, e.g. (torch.zeros(1, 3, 224, 224),)",
        )
    for i, tensor in enumerate(example_inputs):
        if not isinstance(tensor, torch.Tensor):
            raise EdgeqError(f"example input {i} is a {type(tensor).__name__}", "pass tensors only")
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as exc:  # noqa: BLE001 - the user's model on the user's inputs: one line naming the shapes
        shapes = ", ".join(str(tuple(t.shape)) for t in example_inputs)
        raise EdgeqError(
            f"the model cannot run on example_inputs() of shape {shapes}: {type(exc).__name__}: {_first_line(exc)}",
            "make example_inputs() return one batch shaped as the model's forward() expects",
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _user_line(exc: BaseException) -> str:
    """The last frame outside torch and edgeq, as 'file:line (code)'."""
    text = str(exc)
    # torch.export names the user's line in its message, e.g. 'File "x.py", line 12'.
    found = re.findall(r'File "([^"]+)", line (\d+)', text)
    user = [(f, l) for f, l in found if "/torch/" not in f and "/edgeq/" not in f]
    if user:
        return f"{user[-1][0]}:{user[-1][1]}"
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "/torch/" not in f.filename and "/edgeq/" not in f.filename and "/site-packages/" not in f.filename
    ]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "unknown location"


def batched(example_inputs: tuple, size: int = 2) -> tuple:
    """Example inputs repeated to ``size`` along dim 0 (export specialises size-1 dims)."""
    return tuple(t.expand(size, *t.shape[1:]).clone() if t.shape[0] == 1 else t for t in example_inputs)


def export(model: nn.Module, example_inputs: tuple, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension where the model allows one."""
    inputs, dynamic_shapes = example_inputs, None
    if dynamic_batch:
        inputs = batched(example_inputs)
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    try:
        return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # noqa: BLE001 - torch.export fails with many types; each becomes one line
        if dynamic_batch and "batch" in str(exc) and "Constraints violated" in str(exc):
            # The model fixes its batch size somewhere (e.g. a reshape to a
            # constant); fall back to the example's static shape.
            return export(model, example_inputs, dynamic_batch=False)
        raise EdgeqError(
            f"torch.export cannot capture the model at {_user_line(exc)}: {_first_line(exc)}",
            "remove data-dependent Python control flow there (use torch.where or torch.cond) so the graph is static",
        ) from exc


def capture(model: nn.Module, example_inputs: tuple, dynamic_batch: bool = True) -> torch.fx.GraphModule:
    """torch.export the float model; returns the graph module PT2E works on."""
    _check_inputs(model, example_inputs)
    graph = export(model, example_inputs, dynamic_batch).module()
    record_magnitudes(graph, example_inputs)
    return graph


def record_magnitudes(graph: torch.fx.GraphModule, example_inputs: tuple) -> None:
    """Run the example once and keep each node's largest float magnitude (``graph.meta[MAGNITUDES]``),
    so quantizers can tell sentinel tensors (see :func:`edgeq.graph.sentinel_nodes`) from signal."""
    magnitudes: dict[str, float] = {}

    class Probe(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
                magnitudes[n.name] = float(out.detach().abs().max())
            return out

    with torch.no_grad():
        Probe(graph).run(*example_inputs)
    graph.meta[MAGNITUDES] = magnitudes


def capture_for_quantization(model: nn.Module, example_inputs: tuple, fold_bn: bool) -> torch.fx.GraphModule:
    """The graph PT2E quantizes: captured from a copy of ``model``, BatchNorm folded if asked.

    An exported graph shares parameter tensors with the module it came from, and QAT trains
    them in place: the copy keeps the user's float model the float model.
    """
    graph = capture(copy.deepcopy(model), example_inputs)
    if fold_bn:
        fold_batchnorm(graph)
    return graph


def fold_batchnorm(graph: torch.fx.GraphModule) -> int:
    """Fold eval-mode BatchNorm into the preceding conv, in place; returns how many.

    QAT then trains the folded weight itself, so the fake-quantized weight is
    exactly the weight that convert quantizes and the program runs.
    """
    # Private: torchao has no public conv-BN fold for an exported graph (its public
    # prepare_pt2e folds only inside the PT2E flow, after annotation, which is too late
    # for QAT to train the folded weight). tests/test_upstream.py pins its signature.
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    before = sum(1 for n in graph.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))
    _fuse_conv_bn_(graph)
    after = sum(1 for n in graph.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))
    used = {n.target for n in graph.graph.nodes if n.op == "get_attr"}
    for name, param in list(graph.named_parameters()):
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, leaf)
        else:
            # The fold creates its new bias as a frozen tensor; QAT trains it.
            param.requires_grad_(True)
    for name, _ in list(graph.named_buffers()):
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, leaf)
    graph.recompile()
    return before - after
