"""Bundled example recipe: a small CNN on scikit-learn's handwritten digits.

The data are the real 8x8 digits that ship inside scikit-learn (1,797 images),
split once with a fixed seed, so the example needs no network. The float model
trains in a few seconds on a CPU and is cached, keyed by a hash of this file's
architecture and training settings, so later builds skip training.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from edgeq.examples._cache import cached_model

labels = [str(d) for d in range(10)]
preprocessing = {
    "description": "8x8 grayscale digit, pixel values 0..16 divided by 16, layout NCHW",
    "scale": 1.0 / 16.0,
    "mean": 0.0,
    "std": 1.0,
    "layout": "NCHW",
    "color": "grayscale",
}

_SEED = 0
_BATCH = 64
_EPOCHS = 40


class DigitsNet(nn.Module):
    """conv+BN+ReLU, a depthwise-separable block, and a linear head."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.dw = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.pw = nn.Sequential(nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(self.stem(x)))
        return self.head(torch.flatten(self.pool(x), 1))


def _split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype("float32") / 16.0)[:, None, :, :]
    y = digits.target.astype("int64")
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=_SEED, stratify=y)
    return torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte)


_DATA: tuple | None = None


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    global _DATA
    if _DATA is None:
        _DATA = _split()
    return _DATA


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int, shuffle_seed: int | None):
    order = torch.arange(len(x))
    if shuffle_seed is not None:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(shuffle_seed))
    for i in range(0, len(x), batch):
        idx = order[i : i + batch]
        yield x[idx], y[idx]


def _cache_path() -> Path:
    # The key's text is what it was before the helper existed, so caches made then still load.
    root = Path(os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq"))
    key = hashlib.sha256(f"{DigitsNet(), _SEED, _BATCH, _EPOCHS, torch.__version__}".encode()).hexdigest()[:12]
    return root / f"digits-{key}.pt"


def _train_float() -> DigitsNet:
    torch.manual_seed(_SEED)
    net = DigitsNet()
    xtr, ytr, _, _ = _data()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, _EPOCHS)
    net.train()
    for epoch in range(_EPOCHS):
        for xb, yb in _batches(xtr, ytr, _BATCH, shuffle_seed=_SEED * 1000 + epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xb), yb).backward()
            opt.step()
        sched.step()
    return net.eval()


def model() -> nn.Module:
    return cached_model(_cache_path(), DigitsNet(), _train_float)


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.zeros(1, 1, 8, 8),)


def train_data():
    xtr, ytr, _, _ = _data()
    return _batches(xtr, ytr, _BATCH, shuffle_seed=1)


def eval_data():
    _, _, xte, yte = _data()
    return _batches(xte, yte, 120, shuffle_seed=None)
