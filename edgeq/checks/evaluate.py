"""Run a model over a recipe's evaluation data and score it.

Every stage (float model, fake-quant model, converted reference, the .pte in
ExecuTorch's runtime) is scored by this one function, so the numbers in the
report are comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from edgeq.errors import EdgeqError
from edgeq.recipe import as_tuple, select_output
from edgeq.samples import join, to_device


@dataclass
class Evaluation:
    metric: float
    outputs: torch.Tensor
    #: a tensor, a dict of tensors, or :class:`edgeq.samples.Samples` (one target per sample)
    targets: Any
    samples: int


def collect(
    run: Callable[..., torch.Tensor],
    data: Iterable,
    limit: int | None = None,
    progress=None,
    select: Callable[[Any], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, Any]:
    """Concatenate the outputs of ``run(*inputs)`` (the scored one, see Recipe.output), and join the
    targets whatever their structure (:func:`edgeq.samples.join`)."""
    outputs: list[torch.Tensor] = []
    targets: list[Any] = []
    seen = 0
    with torch.no_grad():
        for inputs, target in data:
            out = (select or select_output)(run(*as_tuple(inputs)))
            outputs.append(out.detach().float().cpu())
            targets.append(to_device(target, "cpu"))
            seen += len(outputs[-1])
            if progress is not None:
                progress(len(outputs[-1]))
            if limit is not None and seen >= limit:
                break
    if not outputs:
        raise EdgeqError(
            "eval_data() yielded no batches", "make the recipe's eval_data() yield (inputs, target) batches"
        )
    return torch.cat(outputs), join(targets, [len(o) for o in outputs])


def evaluate(
    run: Callable[..., torch.Tensor],
    data: Iterable,
    metric: Callable,
    progress=None,
    select: Callable[[Any], torch.Tensor] | None = None,
) -> Evaluation:
    outputs, targets = collect(run, data, progress=progress, select=select)
    return Evaluation(float(metric(outputs, targets)), outputs, targets, len(outputs))


def is_classifier_output(outputs: torch.Tensor) -> bool:
    """[samples, classes] scores, where top-1 agreement means something (not a detector's map)."""
    return outputs.dim() == 2 and outputs.shape[-1] > 1


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of samples (percent) on which two models' top-1 predictions agree."""
    return 100.0 * float((a.argmax(-1) == b.argmax(-1)).float().mean())


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference``, in dB."""
    noise = (reference.float() - test.float()).pow(2).mean()
    signal = reference.float().pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))


def cosine(reference: torch.Tensor, test: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(reference.flatten().float(), test.flatten().float(), dim=0))
