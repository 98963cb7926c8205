"""Bundled detection example: find and classify the handwritten digits on a 32x32 canvas.

Each canvas holds one to three of scikit-learn's real 8x8 digits (drawn at 8 or
16 pixels, never overlapping), so the example needs no network; train and
evaluation canvases are built from disjoint digits. The detector is a small
FastestDet-style network: a grid head whose output ``[B, 1 + 4 + 10, 4, 4]``
concatenates an objectness probability, raw box offsets and class
probabilities (the mixed-range concatenation real detectors end in), decoded
by :class:`edgeq.tasks.detection.GridDecoder` and scored by COCO mAP@0.5. The
float model trains in about a minute on a CPU and is cached like the digits
example's.

``edgeq build --target android --recipe edgeq.examples.digit_boxes``
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from edgeq.examples._cache import cache_path, cached_model
from edgeq.tasks.detection import GridDecoder, MeanAveragePrecision

CANVAS = 32
GRID = 4
CLASSES = 10
labels = [str(d) for d in range(CLASSES)]
preprocessing = {
    "description": "32x32 grayscale canvas, pixel values 0..16 divided by 16, layout NCHW",
    "scale": 1.0 / 16.0,
    "mean": 0.0,
    "std": 1.0,
    "layout": "NCHW",
    "color": "grayscale",
}
#: what the app runs on the output: FastestDet's decode and per-class NMS (the bundle's Detections.java)
postprocessing = GridDecoder(classes=CLASSES, conf=0.3, iou=0.45, max_detections=10)
metric = MeanAveragePrecision(postprocessing, iou="0.5")

_SEED = 0
_BATCH = 64
_EPOCHS = 30
_TRAIN_CANVASES = 1536
_EVAL_CANVASES = 384


class DigitBoxNet(nn.Module):
    """conv stem, depthwise-separable blocks down to a 4x4 grid, and FastestDet's three-branch head."""

    def __init__(self, width: int = 32, classes: int = CLASSES) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.ReLU(),
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            )

        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.features = nn.Sequential(
            block(width, width, 1), block(width, 2 * width, 2), block(2 * width, 2 * width, 2)
        )
        self.neck = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.obj = nn.Conv2d(2 * width, 1, 1)
        self.reg = nn.Conv2d(2 * width, 4, 1)
        self.cls = nn.Conv2d(2 * width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.neck(self.features(self.stem(x)))
        return torch.cat((self.obj(x).sigmoid(), self.reg(x), self.cls(x).softmax(dim=1)), dim=1)


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype("float32"))
    y = torch.from_numpy(digits.target.astype("int64"))
    train, held = train_test_split(range(len(x)), test_size=0.2, random_state=_SEED, stratify=digits.target)
    return x[train], y[train], x[held], y[held]


def _canvases(images: torch.Tensor, classes: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, list]:
    """``count`` canvases of 1-3 digits each, and per canvas {"boxes": normalised xyxy, "labels"}; the
    box centres fall in distinct grid cells, as the head can report one digit per cell."""
    g = torch.Generator().manual_seed(seed)
    cell = CANVAS // GRID
    canvas = torch.zeros(count, 1, CANVAS, CANVAS)
    targets = []
    for n in range(count):
        boxes: list[tuple[int, int, int, int]] = []
        chosen: list[int] = []
        cells: set[tuple[float, float]] = set()
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            size = 8 if bool(torch.rand(1, generator=g) < 0.5) else 16
            for _attempt in range(20):
                x0, y0 = (int(v) for v in torch.randint(0, CANVAS - size + 1, (2,), generator=g))
                centre = ((x0 + size / 2) // cell, (y0 + size / 2) // cell)
                clear = all(
                    x0 >= bx1 or x0 + size <= bx0 or y0 >= by1 or y0 + size <= by0 for bx0, by0, bx1, by1 in boxes
                )
                if clear and centre not in cells:
                    break
            else:
                continue
            k = int(torch.randint(0, len(images), (1,), generator=g))
            digit = images[k] if size == 8 else images[k].repeat_interleave(2, 0).repeat_interleave(2, 1)
            canvas[n, 0, y0 : y0 + size, x0 : x0 + size] = digit
            boxes.append((x0, y0, x0 + size, y0 + size))
            chosen.append(int(classes[k]))
            cells.add(centre)
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32) / CANVAS,
                "labels": torch.tensor(chosen, dtype=torch.long),
            }
        )
    return canvas, targets


_DATA: tuple | None = None


def _data() -> tuple:
    global _DATA
    if _DATA is None:
        xtr, ytr, xte, yte = _digits()
        _DATA = (*_canvases(xtr, ytr, _TRAIN_CANVASES, _SEED + 1), *_canvases(xte, yte, _EVAL_CANVASES, _SEED + 2))
    return _DATA


def _batches(x: torch.Tensor, targets: list, batch: int, shuffle_seed: int | None):
    order = torch.arange(len(x))
    if shuffle_seed is not None:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(shuffle_seed))
    for i in range(0, len(x), batch):
        idx = order[i : i + batch]
        yield x[idx], [targets[int(j)] for j in idx]


def loss(output: torch.Tensor, targets: list) -> torch.Tensor:
    """FastestDet's assignment, simplified: each box belongs to the cell holding its centre; binary
    cross-entropy on objectness everywhere, and on that cell the box parameters (in the head's own
    tanh/sigmoid space) and the class."""
    batch, _, height, width = output.shape
    obj_target = torch.zeros(batch, height, width)
    box_terms, class_terms = [], []
    eps = 1e-4
    for b, target in enumerate(targets):
        boxes, classes = target["boxes"], target["labels"]
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), classes.tolist()):
            cx, cy = (x1 + x2) / 2 * width, (y1 + y2) / 2 * height
            gx, gy = min(int(cx), width - 1), min(int(cy), height - 1)
            obj_target[b, gy, gx] = 1.0
            want = torch.tensor(
                [
                    math.atanh(min(cx - gx, 1 - eps)),
                    math.atanh(min(cy - gy, 1 - eps)),
                    math.log((x2 - x1) / (1 - (x2 - x1) + eps)),
                    math.log((y2 - y1) / (1 - (y2 - y1) + eps)),
                ]
            )
            box_terms.append(nn.functional.smooth_l1_loss(output[b, 1:5, gy, gx], want))
            class_terms.append(-torch.log(output[b, 5 + label, gy, gx].clamp(min=eps)))
    objectness = nn.functional.binary_cross_entropy(output[:, 0].clamp(eps, 1 - eps), obj_target)
    if not box_terms:
        return objectness
    return objectness + torch.stack(box_terms).mean() + torch.stack(class_terms).mean()


def _cache_path() -> Path:
    return cache_path("digit-boxes", f"{DigitBoxNet()}{_SEED}{_BATCH}{_EPOCHS}{_TRAIN_CANVASES}{CANVAS}{GRID}")


def fit_on_canvases(
    make: Callable[[], nn.Module], loss_fn: Callable, epochs: int, lr: float, batch: int, canvas_seed: int,
    batches: Callable[[Iterator], Iterator] = lambda b: b,
) -> nn.Module:  # fmt: skip
    """Train ``make()``'s network with Adam and a cosine schedule on fresh canvases of the training
    digits every epoch (``canvas_seed`` offsets their layout; ``batches`` may turn each batch into
    the task's targets): the same 1,437 digits in new places, where one fixed set of canvases lets
    the network memorise positions."""
    torch.manual_seed(_SEED)
    net = make()
    digits, classes = _digits()[:2]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    net.train()
    for epoch in range(epochs):
        x, targets = _canvases(digits, classes, _TRAIN_CANVASES, _SEED * 1000 + epoch + canvas_seed)
        for xb, tb in batches(_batches(x, targets, batch, shuffle_seed=_SEED * 1000 + epoch)):
            opt.zero_grad()
            loss_fn(net(xb), tb).backward()
            opt.step()
        sched.step()
    return net.eval()


def _train_float() -> nn.Module:
    return fit_on_canvases(DigitBoxNet, loss, _EPOCHS, lr=3e-3, batch=_BATCH, canvas_seed=100)


def model() -> nn.Module:
    return cached_model(_cache_path(), DigitBoxNet(), _train_float)


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.zeros(1, 1, CANVAS, CANVAS),)


def train_data():
    x, targets = _data()[:2]
    return _batches(x, targets, _BATCH, shuffle_seed=1)


def eval_data():
    x, targets = _data()[2:]
    return _batches(x, targets, 128, shuffle_seed=None)
