"""The bundled examples train their float model once and keep its weights under $EDGEQ_CACHE."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def cache_path(name: str, settings: str) -> Path:
    """Where ``name``'s weights live, keyed by everything that determines them."""
    root = Path(os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq"))
    key = hashlib.sha256(f"{settings}{torch.__version__}".encode()).hexdigest()[:12]
    return root / f"{name}-{key}.pt"


def cached_model(path: Path, empty: nn.Module, train: Callable[[], nn.Module]) -> nn.Module:
    """``empty`` loaded from ``path``, or ``train()``'s model, saved there atomically (several builds
    may train at once)."""
    if path.exists():
        empty.load_state_dict(torch.load(path, weights_only=True))
        return empty.eval()
    net = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, path)
    return net.eval()
