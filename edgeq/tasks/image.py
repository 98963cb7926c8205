"""Image input: the resize (letterbox or stretch), channel order and normalisation an app applies to a photo.

A recipe sets ``preprocessing = ImageInput(size=(320, 320), resize="letterbox", ...)``
and uses the object itself to make its data, so training, evaluation and the
app run one definition. Its :meth:`ImageInput.manifest` (every parameter) goes
to ``manifest.json``, and the bundle's ``ImageInput.java`` implements the same
steps on an Android bitmap's ARGB pixels; tests/test_image_input.py holds the
Java equal to this reference on real photos.

Letterbox: the photo is scaled by ``r = min(H / h, W / w)`` to ``round(h r) x
round(w r)``, bilinear (half-pixel centres, no antialiasing: PyTorch's
``interpolate(..., align_corners=False)``, OpenCV's ``INTER_LINEAR``), and
centred on an ``H x W`` canvas of ``pad``; boxes found on the canvas map back to
the photo with :meth:`ImageInput.to_image`. Stretch: resized to ``H x W``,
aspect ratio not kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edgeq.errors import EdgeqError

__all__ = ["ImageInput"]


@dataclass(frozen=True)
class Placement:
    """Where the resized photo sits on the program's input canvas, in pixels."""

    height: int
    width: int
    top: int
    left: int


@dataclass(frozen=True)
class ImageInput:
    #: the program's input (height, width) in pixels
    size: tuple[int, int]
    resize: str = "letterbox"
    #: the padding pixels' value, on the 0..255 scale of the photo (YOLO's grey: 114)
    pad: float = 114.0
    #: x' = (x * scale - mean[c]) / std[c], x on 0..255, c in the program's channel order (``color``)
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    #: the channel order the program takes
    color: str = "RGB"
    layout: str = field(default="NCHW", init=False)

    def __post_init__(self) -> None:
        size = tuple(int(v) for v in self.size)
        if len(size) != 2 or min(size) <= 0:
            raise EdgeqError(f"ImageInput size {self.size}", "pass the program's input as (height, width) in pixels")
        object.__setattr__(self, "size", size)
        if self.resize not in ("letterbox", "stretch"):
            raise EdgeqError(f"ImageInput resize={self.resize!r}", 'use resize="letterbox" or resize="stretch"')
        if self.color not in ("RGB", "BGR"):
            raise EdgeqError(f"ImageInput color={self.color!r}", 'use color="RGB" or color="BGR"')
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise EdgeqError(f"ImageInput mean={self.mean} std={self.std}", "give three means and three positive stds")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def placement(self, height: int, width: int) -> Placement:
        """Where a ``height x width`` photo lands on the input canvas."""
        target_h, target_w = self.size
        if self.resize == "stretch":
            return Placement(target_h, target_w, 0, 0)
        ratio = min(target_h / height, target_w / width)
        # halves round up (Java's Math.round), not to even as Python's round() would
        new_h = min(target_h, max(1, int(np.floor(height * ratio + 0.5))))
        new_w = min(target_w, max(1, int(np.floor(width * ratio + 0.5))))
        return Placement(new_h, new_w, (target_h - new_h) // 2, (target_w - new_w) // 2)

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """An ``H x W x 3`` RGB photo (uint8, 0..255) -> the program's ``[3, H, W]`` float input."""
        pixels = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image, copy=True))
        if pixels.dim() != 3 or pixels.shape[-1] != 3:
            raise EdgeqError(
                f"ImageInput takes an H x W x 3 RGB photo, got shape {tuple(pixels.shape)}",
                "pass the decoded photo (e.g. numpy.asarray(PIL.Image.open(path).convert('RGB')))",
            )
        at = self.placement(pixels.shape[0], pixels.shape[1])
        chw = pixels.permute(2, 0, 1).float()[None]
        resized = torch.nn.functional.interpolate(
            chw, size=(at.height, at.width), mode="bilinear", align_corners=False, antialias=False
        )[0]
        canvas = torch.full((3, *self.size), float(self.pad))
        canvas[:, at.top : at.top + at.height, at.left : at.left + at.width] = resized
        if self.color == "BGR":
            canvas = canvas.flip(0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (canvas * self.scale - mean) / std

    def to_image(self, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Boxes ``[N, 4]`` (x1, y1, x2, y2, normalised to the input canvas) -> normalised to the
        ``height x width`` photo, clipped to it."""
        at = self.placement(height, width)
        target_h, target_w = self.size
        x = (boxes[:, 0::2] * target_w - at.left) / at.width
        y = (boxes[:, 1::2] * target_h - at.top) / at.height
        return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=-1).clamp(0.0, 1.0)

    def manifest(self) -> dict[str, Any]:
        return {
            "kind": "image",
            "size": list(self.size),
            "resize": self.resize,
            "interpolation": "bilinear, half-pixel centres, no antialiasing",
            "pad": self.pad,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
            "color": self.color,
            "layout": self.layout,
        }
