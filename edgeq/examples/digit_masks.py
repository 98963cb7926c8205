"""Bundled segmentation example: label every pixel of a 32x32 canvas with the digit it belongs to.

The canvases are :mod:`edgeq.examples.digit_boxes`' (one to three of
scikit-learn's real 8x8 digits, drawn at 8 or 16 pixels, train and evaluation
canvases from disjoint digits); a pixel's class is its digit + 1 where the ink
is darker than a quarter of full scale, 0 (background) elsewhere. The network
is a small encoder-decoder in ESPNet's manner (strided convolutions down,
transposed convolutions up, a skip concatenation) whose output ``[B, 11, 32,
32]`` is per-pixel class scores, turned into a mask by
:class:`edgeq.tasks.segmentation.SegmentationMasks` and scored by mIoU. It
trains in about half a minute on a CPU and is cached like the other examples.

``edgeq build --target android --recipe edgeq.examples.digit_masks``
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgeq.examples import digit_boxes as base
from edgeq.examples._cache import cache_path, cached_model
from edgeq.tasks.segmentation import MeanIoU, SegmentationMasks

CLASSES = 1 + base.CLASSES
#: ink above this (of 16) belongs to the digit
_INK = 4.0
labels = ["background", *base.labels]
preprocessing = base.preprocessing
postprocessing = SegmentationMasks(classes=CLASSES)
metric = MeanIoU(postprocessing)

_SEED = 0
_EPOCHS = 14
_BATCH = 32
#: background is 90% of the pixels: weighed less, or the network settles on "all background" first
_WEIGHTS = torch.tensor([0.3] + [1.0] * base.CLASSES)


class DigitMaskNet(nn.Module):
    """Three stride-2 stages down to 4x4 (a digit's context), transposed convolutions back up with
    a skip concatenation at 8x8 and 16x16."""

    def __init__(self, width: int = 32, classes: int = CLASSES) -> None:
        super().__init__()

        def cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = cbr(1, width, 2)  # 16x16
        self.down1 = cbr(width, 2 * width, 2)  # 8x8
        self.down2 = nn.Sequential(cbr(2 * width, 4 * width, 2), cbr(4 * width, 4 * width))  # 4x4
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2, bias=False)
        self.merge2 = cbr(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2, bias=False)
        self.merge1 = cbr(2 * width, width)
        self.classifier = nn.ConvTranspose2d(width, classes, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s16 = self.stem(x)
        s8 = self.down1(s16)
        x8 = self.merge2(torch.cat([self.up2(self.down2(s8)), s8], dim=1))
        x16 = self.merge1(torch.cat([self.up1(x8), s16], dim=1))
        return self.classifier(x16)


def masks(canvas: torch.Tensor, targets: list) -> torch.Tensor:
    """Per-pixel classes ``[B, 32, 32]`` of canvases from their digits' boxes (which never overlap)."""
    out = torch.zeros(canvas.shape[0], base.CANVAS, base.CANVAS, dtype=torch.long)
    for n, target in enumerate(targets):
        for box, label in zip((target["boxes"] * base.CANVAS).round().long().tolist(), target["labels"].tolist()):
            x0, y0, x1, y1 = box
            ink = canvas[n, 0, y0:y1, x0:x1] > _INK
            out[n, y0:y1, x0:x1][ink] = 1 + label
    return out


def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target, weight=_WEIGHTS)


def _cache_path() -> Path:
    return cache_path(
        "digit-masks", f"{DigitMaskNet()}{_SEED}{_EPOCHS}{_BATCH}{_INK}{_WEIGHTS.tolist()}{base._TRAIN_CANVASES}"
    )


def _train_float() -> nn.Module:
    return base.fit_on_canvases(
        DigitMaskNet, loss, _EPOCHS, lr=1e-2, batch=_BATCH, canvas_seed=300, batches=_with_masks
    )


def model() -> nn.Module:
    return cached_model(_cache_path(), DigitMaskNet(), _train_float)


def example_inputs() -> tuple[torch.Tensor]:
    return base.example_inputs()


def _with_masks(batches):
    """Canvases scaled as the preprocessing says (0..16 -> 0..1), with their masks."""
    for x, targets in batches:
        yield x * base.preprocessing["scale"], masks(x, targets)


def train_data():
    return _with_masks(base.train_data())


def eval_data():
    return _with_masks(base.eval_data())
