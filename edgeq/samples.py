"""Targets of any structure, joined across batches and indexed by sample.

A classifier's targets are a tensor of class indices and batches concatenate.
A detector's are a list of boxes per image (or a dict per image), which no
``torch.cat`` can join: those become :class:`Samples`, a list with one entry
per sample that resamples (bootstrap) and slices like a tensor, and reaches
the recipe's ``loss()`` and ``metric()`` exactly as the recipe gave it.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from edgeq.errors import EdgeqError

__all__ = ["Samples", "count", "join", "take", "to_device"]


class Samples(list):
    """One target per sample, in sample order; indexing with a tensor, a list or a slice gives Samples."""

    def __getitem__(self, index: Any) -> Any:  # type: ignore[override]
        if isinstance(index, slice):
            return Samples(list.__getitem__(self, index))
        if isinstance(index, torch.Tensor):
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
            if index.dim() == 0:
                return super().__getitem__(int(index))
            index = index.tolist()
        if isinstance(index, (list, tuple, np.ndarray)):
            return Samples([list.__getitem__(self, int(i)) for i in index])
        return super().__getitem__(index)


def _numeric(target: Any) -> bool:
    if isinstance(target, (torch.Tensor, np.ndarray, numbers.Number)):
        return True
    return isinstance(target, (list, tuple)) and all(
        isinstance(t, numbers.Number) or (isinstance(t, torch.Tensor) and t.dim() == 0) for t in target
    )


def _per_sample(target: Any, batch: int | None) -> list:
    if isinstance(target, dict):
        raise EdgeqError(
            "a batch's target is a dict whose values are not batched tensors",
            "yield a list with one target (a dict or tensor) per sample, or a dict of tensors batched on dim 0",
        )
    items = list(target)
    if batch is not None and len(items) != batch:
        raise EdgeqError(
            f"a batch of {batch} samples came with {len(items)} targets",
            "yield one target per sample (e.g. a list with one boxes tensor per image)",
        )
    return items


def join(parts: list, sizes: list[int] | None = None) -> Any:
    """Join per-batch targets: tensors (and numbers) concatenate, dicts of batched tensors join key by
    key, anything else (a list of per-sample targets) becomes :class:`Samples`. ``sizes``: the batch
    sizes, to check that a per-sample list has one target per sample."""
    if not parts:
        return torch.empty(0)
    if all(_numeric(p) for p in parts):
        tensors = [torch.as_tensor(p) for p in parts]
        tensors = [t.reshape(1) if t.dim() == 0 else t for t in tensors]
        try:
            return torch.cat(tensors)
        except RuntimeError as exc:
            raise EdgeqError(
                f"batch targets of shapes {sorted({tuple(t.shape) for t in tensors})} do not concatenate",
                "yield targets of one shape past the batch dimension, or a list with one target per sample",
            ) from exc
    if all(isinstance(p, dict) for p in parts) and all(isinstance(v, torch.Tensor) for p in parts for v in p.values()):
        keys = set(parts[0])
        if any(set(p) != keys for p in parts):
            raise EdgeqError("batch targets are dicts with different keys", "yield the same keys in every batch")
        return {k: join([p[k] for p in parts]) for k in parts[0]}
    joined = Samples()
    for n, part in enumerate(parts):
        joined.extend(_per_sample(part, sizes[n] if sizes else None))
    return joined


def take(targets: Any, index: Any) -> Any:
    """The targets of samples ``index`` (a tensor of indices), whatever their structure."""
    if isinstance(targets, dict):
        return {k: take(v, index) for k, v in targets.items()}
    return targets[index]


def count(targets: Any) -> int:
    if isinstance(targets, dict):
        return count(next(iter(targets.values()))) if targets else 0
    return len(targets)


def to_device(target: Any, device: torch.device | str) -> Any:
    """Tensors anywhere inside ``target`` moved to ``device``; everything else as it was."""
    if isinstance(target, torch.Tensor):
        return target.to(device)
    if isinstance(target, dict):
        return {k: to_device(v, device) for k, v in target.items()}
    if isinstance(target, Samples):
        return Samples(to_device(t, device) for t in target)
    if isinstance(target, (list, tuple)):
        return type(target)(to_device(t, device) for t in target)
    return target
