"""The bundled examples train their float model once and keep its weights under $EDGEQ_CACHE."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

#: Intra-op threads every example trains with. A float reduction's order follows the thread count,
#: so the same seed trained with 1 thread or 2 gives different weights (digits: up to 0.07 apart),
#: and a build's outcome then hung on which process trained the example first (a test worker with
#: 1 thread or a CLI subprocess with all cores). One thread, not two: parallel test workers hold
#: one core each, and a worker training with two oversubscribed the cores (the detector's training
#: set up in 366 s in a CI run against 52 s alone); one thread costs 10-30% (digits 11.6 s against 9.0 s).
TRAIN_THREADS = 1


def cache_path(name: str, settings: str) -> Path:
    """Where ``name``'s weights live, keyed by everything that determines them."""
    root = Path(os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq"))
    key = hashlib.sha256(f"{settings}{torch.__version__}threads={TRAIN_THREADS}".encode()).hexdigest()[:12]
    return root / f"{name}-{key}.pt"


def cached_model(path: Path, empty: nn.Module, train: Callable[[], nn.Module]) -> nn.Module:
    """``empty`` loaded from ``path``, or ``train()``'s model, saved there atomically. Builds that
    start at once (parallel test workers, a sweep) train it once: the others wait on a lock file
    beside it, then load it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock")):
        if path.exists():
            empty.load_state_dict(torch.load(path, weights_only=True))
            return empty.eval()
        net = _with_threads(TRAIN_THREADS, train)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(net.state_dict(), tmp)
        os.replace(tmp, path)
        return net.eval()


def _with_threads(threads: int, train: Callable[[], nn.Module]) -> nn.Module:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return train()
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _locked(lock: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent builds may each train, as before
        yield
        return
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
