"""QAT checkpoints: written atomically, loaded without running arbitrary code."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeq.errors import EdgeqError


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def save(path: Path, state: dict[str, Any]) -> None:
    """Write via a temporary file and rename, so a kill never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    """``torch.load(..., weights_only=True)``: tensors and plain containers only."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise EdgeqError(
            f"checkpoint {path} needs arbitrary code to load (it pickles objects other than tensors "
            "and plain containers); refusing it",
            "delete it and rebuild without --resume, or use a checkpoint edgeq wrote",
        ) from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise EdgeqError(f"checkpoint {path} cannot be read: {exc}", "delete it and rebuild without --resume") from exc
