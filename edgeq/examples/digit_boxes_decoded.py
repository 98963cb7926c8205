"""The digit detector with its decode inside the model, as YOLO-family exports ship.

The same network as :mod:`edgeq.examples.digit_boxes`, wrapped so its output is
``[B, 16, 4 + 1 + 10]`` rows of box centre and size in canvas pixels, then
objectness and class probabilities: one tensor that mixes 0..32 with 0..1 (the
concatenation edgeq keeps in float on CPU targets), decoded by
:class:`edgeq.tasks.detection.YoloDecoder`. Its training targets are the float
model's own outputs (distillation data needs no labels); the evaluation data
carries the real boxes.

``edgeq build --target android --recipe edgeq.examples.digit_boxes_decoded``
"""

from __future__ import annotations

import torch
from torch import nn

from edgeq.examples import digit_boxes as base
from edgeq.tasks.detection import MeanAveragePrecision, YoloDecoder

labels = base.labels
preprocessing = base.preprocessing
postprocessing = YoloDecoder(classes=base.CLASSES, input_size=(base.CANVAS, base.CANVAS), conf=0.3, max_detections=10)
metric = MeanAveragePrecision(postprocessing, iou="0.5")


class Decoded(nn.Module):
    """FastestDet's box decode in the graph: grid offsets become pixel boxes, rows per cell."""

    def __init__(self, net: nn.Module, canvas: int = base.CANVAS, grid: int = base.GRID) -> None:
        super().__init__()
        self.net, self.canvas = net, canvas
        gy, gx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        # expand(): one grid shared by every image, as YOLO heads build theirs
        self.register_buffer("gx", gx.float().reshape(1, -1).expand(1, grid * grid), persistent=False)
        self.register_buffer("gy", gy.float().reshape(1, -1).expand(1, grid * grid), persistent=False)
        self.cell = canvas / grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x).flatten(2).transpose(1, 2)  # [B, cells, 15]
        cx = (out[..., 1].tanh() + self.gx) * self.cell
        cy = (out[..., 2].tanh() + self.gy) * self.cell
        w, h = out[..., 3].sigmoid() * self.canvas, out[..., 4].sigmoid() * self.canvas
        box = torch.stack([cx, cy, w, h], dim=-1)
        return torch.cat([box, out[..., :1], out[..., 5:]], dim=-1)


def model() -> nn.Module:
    return Decoded(base.model()).eval()


def example_inputs() -> tuple[torch.Tensor]:
    return base.example_inputs()


def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error to the float model's decoded output (the training targets)."""
    return nn.functional.mse_loss(output, target)


_TEACHER: nn.Module | None = None


def train_data():
    global _TEACHER
    if _TEACHER is None:
        _TEACHER = model()
    for x, _boxes in base.train_data():
        with torch.no_grad():
            teacher = _TEACHER(x)
        yield x, teacher


def eval_data():
    return base.eval_data()
