"""Object detection: the head decoders, NMS and mAP a detector recipe scores with.

A detector's raw output (``[B, 1 + 4 + C, H, W]`` for a FastestDet-style grid
head, ``[B, N, 5 + C]`` for a YOLO-style decoded one) becomes boxes only after
the decode and NMS the app runs. The decoders here are the Python reference of
that post-processing: the bundle's ``Detections.java`` implements the same
steps from the manifest's parameters, and the tests hold the two equal on real
outputs. mAP is COCO's own evaluation (pycocotools), never hand-written AP code.

Boxes are ``x1, y1, x2, y2`` normalised to 0..1 of the model's input
everywhere, predictions and targets alike.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from edgeq.errors import EdgeqError

__all__ = [
    "GridDecoder",
    "MeanAveragePrecision",
    "YoloDecoder",
    "batched_nms",
    "decoder_from_manifest",
    "yolo_targets",
]

#: the box layouts a target may come in (converted to normalised xyxy on arrival)
BOX_FORMATS = ("xyxy", "cxcywh", "xywh")


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box in ``a`` [N, 4] with every box in ``b`` [M, 4] (xyxy), float32 as the app computes it."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    left_top = torch.maximum(a[:, None, :2], b[None, :, :2])
    right_bottom = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (right_bottom - left_top).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(union))


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy per-class NMS: indices kept, highest score first (ties: lower index first), the order
    the bundle's Java reproduces."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.sort(scores, descending=True, stable=True).indices
    overlaps = box_iou(boxes[order], boxes[order])
    same = labels[order][:, None] == labels[order][None, :]
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(int(order[i]))
        suppressed |= (overlaps[i] > iou) & same[i]
    return torch.tensor(keep, dtype=torch.long)


def _detections(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, conf: float, iou: float, top: int):
    chosen = scores > conf
    boxes, scores, labels = boxes[chosen], scores[chosen], labels[chosen]
    keep = batched_nms(boxes, scores, labels, iou)[:top]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def _check_output(output: torch.Tensor, dims: int, channels: int, dim: int, what: str) -> None:
    if output.dim() != dims or output.shape[dim] != channels:
        raise EdgeqError(
            f"{what} expects an output with {channels} values on dim {dim} of a {dims}-d tensor, "
            f"got shape {tuple(output.shape)}",
            "set the decoder's classes to the model's class count, or pick the decoder matching the head "
            "(GridDecoder: [B, 5 + C, H, W]; YoloDecoder: [B, N, 5 + C])",
        )


class _Decoder:
    """What every head decoder shares: thresholding, NMS and its manifest entry; a subclass says how
    its head's output becomes per-image candidates (``candidates``) and names itself (``kind``)."""

    kind = ""
    conf: float
    iou: float
    max_detections: int

    def candidates(self, output: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def __call__(self, output: torch.Tensor, conf: float | None = None) -> list[dict[str, torch.Tensor]]:
        threshold = self.conf if conf is None else conf
        return [_detections(*c, threshold, self.iou, self.max_detections) for c in self.candidates(output)]

    def manifest(self) -> dict[str, Any]:
        # JSON has no tuples: YoloDecoder's input_size is written as a list, as the manifest schema says
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # type: ignore[call-overload]
        return {"decoder": self.kind, **fields}


@dataclass(frozen=True)
class GridDecoder(_Decoder):
    """A FastestDet-style anchor-free grid head: ``[B, 1 + 4 + classes, H, W]`` with channel 0 the
    objectness probability, 1-2 the box centre as ``tanh`` offsets from its cell, 3-4 the box size
    as ``sigmoid`` fractions of the image, then the class probabilities; a box's score is
    ``obj ** obj_power * max(class) ** (1 - obj_power)``."""

    classes: int
    #: score threshold for the boxes the app shows (the mAP metric uses its own, lower one)
    conf: float = 0.25
    #: NMS IoU threshold
    iou: float = 0.45
    max_detections: int = 100
    obj_power: float = 0.6

    kind = "grid"

    def __post_init__(self) -> None:
        _check_thresholds(self.conf, self.iou, self.classes)

    def candidates(self, output: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per image, every cell's box, score and class before thresholding."""
        _check_output(output, 4, 5 + self.classes, 1, "GridDecoder")
        out = output.detach().float().permute(0, 2, 3, 1)
        batch, height, width, _ = out.shape
        gy, gx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        obj, cls = out[..., 0], out[..., 5:]
        best, labels = cls.max(dim=-1)
        scores = obj.clamp(min=0).pow(self.obj_power) * best.clamp(min=0).pow(1 - self.obj_power)
        cx = (out[..., 1].tanh() + gx) / width
        cy = (out[..., 2].tanh() + gy) / height
        w, h = out[..., 3].sigmoid(), out[..., 4].sigmoid()
        boxes = _to_xyxy(torch.stack([cx, cy, w, h], dim=-1), "cxcywh")
        return [(boxes[b].reshape(-1, 4), scores[b].reshape(-1), labels[b].reshape(-1)) for b in range(batch)]


@dataclass(frozen=True)
class YoloDecoder(_Decoder):
    """A YOLO-style decoded head: ``[B, N, 4 + 1 + classes]`` rows of box centre and size in input
    pixels, objectness and class probabilities; a box's score is ``obj * max(class)``."""

    classes: int
    #: the model's input (height, width) in pixels, to normalise the boxes
    input_size: tuple[int, int]
    conf: float = 0.25
    iou: float = 0.45
    max_detections: int = 100

    kind = "yolo"

    def __post_init__(self) -> None:
        _check_thresholds(self.conf, self.iou, self.classes)
        if len(self.input_size) != 2 or min(self.input_size) <= 0:
            raise EdgeqError(f"YoloDecoder input_size {self.input_size}", "pass (height, width) in pixels")

    def candidates(self, output: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        _check_output(output, 3, 5 + self.classes, 2, "YoloDecoder")
        out = output.detach().float()
        height, width = self.input_size
        best, labels = out[..., 5:].max(dim=-1)
        scores = out[..., 4] * best
        cx, cy, w, h = out[..., 0] / width, out[..., 1] / height, out[..., 2] / width, out[..., 3] / height
        boxes = _to_xyxy(torch.stack([cx, cy, w, h], dim=-1), "cxcywh")
        return [(boxes[b], scores[b], labels[b]) for b in range(out.shape[0])]


Decoder = GridDecoder | YoloDecoder


def decoder_from_manifest(data: dict[str, Any]) -> Decoder:
    """The decoder a manifest's ``postprocessing`` describes (what the bundle's Java reads)."""
    fields = {k: v for k, v in data.items() if k not in ("decoder", "task")}
    if data.get("decoder") == "grid":
        return GridDecoder(**fields)
    if data.get("decoder") == "yolo":
        fields["input_size"] = tuple(fields["input_size"])
        return YoloDecoder(**fields)
    raise EdgeqError(f"unknown detection decoder {data.get('decoder')!r}", "use 'grid' or 'yolo'")


def _check_thresholds(conf: float, iou: float, classes: int) -> None:
    if not 0 <= conf < 1 or not 0 < iou <= 1 or classes < 1:
        raise EdgeqError(
            f"detection decoder with conf={conf}, iou={iou}, classes={classes}",
            "use 0 <= conf < 1, 0 < iou <= 1 and classes >= 1",
        )


def _to_xyxy(boxes: torch.Tensor, box_format: str) -> torch.Tensor:
    if box_format == "cxcywh":
        cx, cy, w, h = boxes.unbind(-1)
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    if box_format == "xywh":
        x, y, w, h = boxes.unbind(-1)
        return torch.stack([x, y, x + w, y + h], dim=-1)
    return boxes


def yolo_targets(rows: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
    """One image's target from YOLO label rows ``class cx cy w h`` (normalised), as the metric takes it."""
    rows = torch.as_tensor(rows, dtype=torch.float32).reshape(-1, 5)
    return {"boxes": _to_xyxy(rows[:, 1:], "cxcywh"), "labels": rows[:, 0].long()}


class MeanAveragePrecision:
    """COCO mAP (pycocotools' COCOeval) of decoded predictions against boxes, in percent.

    ``metric = MeanAveragePrecision(GridDecoder(classes=80))`` scores a recipe's raw outputs:
    targets are per image ``{"boxes": [M, 4], "labels": [M]}`` (normalised, ``box_format``) or
    a tensor shaped like the outputs (a float teacher's raw outputs, as ``train_data()`` may
    yield), whose decoded boxes above ``teacher_conf`` stand in for ground truth. ``iou``: "0.5"
    (mAP@0.5) or "0.5:0.95" (COCO's primary metric).
    """

    def __init__(
        self,
        decoder: Decoder,
        iou: str = "0.5",
        box_format: str = "xyxy",
        conf: float = 0.001,
        teacher_conf: float | None = None,
    ) -> None:
        if iou not in ("0.5", "0.5:0.95"):
            raise EdgeqError(f"unknown mAP IoU setting {iou!r}", 'use iou="0.5" or iou="0.5:0.95"')
        if box_format not in BOX_FORMATS:
            raise EdgeqError(f"unknown box_format {box_format!r}", f"use one of {', '.join(BOX_FORMATS)}")
        self.decoder, self.iou, self.box_format, self.conf = decoder, iou, box_format, conf
        self.teacher_conf = decoder.conf if teacher_conf is None else teacher_conf
        self.__name__ = f"mAP@{iou}"

    def __repr__(self) -> str:
        return f"MeanAveragePrecision({self.decoder!r}, iou={self.iou!r})"

    def truth(self, outputs: torch.Tensor, targets: Any) -> list[dict[str, torch.Tensor]]:
        """Ground-truth boxes per image, checked; a teacher's raw outputs decoded."""
        if isinstance(targets, torch.Tensor) and targets.shape == outputs.shape and targets.is_floating_point():
            return [{"boxes": d["boxes"], "labels": d["labels"]} for d in self.decoder(targets, conf=self.teacher_conf)]
        if isinstance(targets, torch.Tensor) or len(targets) != len(outputs):
            raise EdgeqError(
                f"the mAP metric got {len(outputs)} outputs and targets of type {type(targets).__name__} "
                f"({len(targets)} of them)",
                'yield one target per image: {"boxes": [M, 4] tensor, "labels": [M] tensor} '
                "(edgeq.tasks.detection.yolo_targets makes one from YOLO label rows)",
            )
        return [self._checked(t, n) for n, t in enumerate(targets)]

    def _checked(self, target: Any, n: int) -> dict[str, torch.Tensor]:
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise EdgeqError(
                f"image {n}'s target is a {type(target).__name__}, not a dict with boxes and labels",
                'yield {"boxes": [M, 4] tensor, "labels": [M] tensor} per image '
                "(edgeq.tasks.detection.yolo_targets converts YOLO label rows)",
            )
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(target["labels"]).reshape(-1).long()
        if len(boxes) != len(labels):
            raise EdgeqError(f"image {n} has {len(boxes)} boxes and {len(labels)} labels", "give one label per box")
        boxes = _to_xyxy(boxes, self.box_format)
        if len(boxes) and bool(((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any()):
            raise EdgeqError(
                f"image {n} has boxes with x2 < x1 or y2 < y1 read as {self.box_format}",
                "pass box_format='cxcywh' or 'xywh' to MeanAveragePrecision if the boxes are not x1,y1,x2,y2",
            )
        if len(boxes) and float(boxes.abs().max()) > 1.5:
            raise EdgeqError(
                f"image {n} has box coordinates up to {float(boxes.abs().max()):.1f}: pixels, not 0..1",
                "divide the target boxes by the input width and height (the decoders give 0..1 boxes)",
            )
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.decoder.classes):
            raise EdgeqError(
                f"image {n} has class {int(labels.max())} but the decoder has {self.decoder.classes} classes",
                "give class ids 0..classes-1, or set the decoder's classes",
            )
        return {"boxes": boxes, "labels": labels}

    def __call__(self, outputs: torch.Tensor, targets: Any) -> float:
        truth = self.truth(outputs, targets)
        predictions = self.decoder(outputs, conf=self.conf)
        return coco_map(predictions, truth, self.decoder.classes, self.iou)

    def resampler(self, outputs: torch.Tensor, targets: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """The metric on each row of the indices it is given (bootstrap resamples of the images):
        decoded and matched here, once, and accumulated per resample (edgeq.checks.stats uses it
        when a metric has it)."""
        evaluation = _evaluated(
            self.decoder(outputs, conf=self.conf), self.truth(outputs, targets), self.decoder.classes, self.iou
        )
        return lambda indices: torch.tensor(
            [_accumulated(evaluation, row.tolist()) for row in indices], dtype=torch.float64
        )

    def resampled(self, outputs: torch.Tensor, targets: Any, indices: torch.Tensor) -> torch.Tensor:
        """:meth:`resampler`, prepared and applied to ``indices`` in one call."""
        return self.resampler(outputs, targets)(indices)


def _evaluated(predictions: list[dict], truth: list[dict], classes: int, iou: str) -> Any:
    """pycocotools' COCOeval with evaluate() done: per image and class, which detection matched which
    box (normalised xyxy scaled to a 1000-pixel canvas, so COCO's area ranges do not matter); None
    when nothing is there to score."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise EdgeqError("the mAP metric needs pycocotools", "pip install 'edgeq[vision]'") from exc
    if not any(len(t["labels"]) for t in truth):
        return None

    def xywh(boxes: torch.Tensor) -> list[list[float]]:
        b = boxes.double() * 1000.0
        return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1).tolist()

    images = [{"id": i + 1, "width": 1000, "height": 1000} for i in range(len(truth))]
    annotations: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []
    for i, t in enumerate(truth):
        for box, label in zip(xywh(t["boxes"]), t["labels"].tolist()):
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label) + 1, "bbox": box}
                | {"area": max(box[2], 0.0) * max(box[3], 0.0), "iscrowd": 0}
            )
    for i, p in enumerate(predictions):
        for box, score, label in zip(xywh(p["boxes"]), p["scores"].tolist(), p["labels"].tolist()):
            detections.append({"image_id": i + 1, "category_id": int(label) + 1, "bbox": box, "score": score})
    if not detections:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c + 1, "name": str(c)} for c in range(classes)],
        }
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(detections), "bbox")
        # Only what the figure needs (one area range, 100 detections, the asked IoUs): the number
        # COCOeval.summarize() prints for "all" areas, 10-40x sooner.
        if iou == "0.5":
            evaluation.params.iouThrs = np.array([0.5])
        evaluation.params.areaRng, evaluation.params.areaRngLbl = [[0.0, 1e10]], ["all"]
        evaluation.params.maxDets = [100]
        evaluation.evaluate()
    return evaluation


def _accumulated(evaluation: Any, images: list[int] | None = None) -> float:
    """mAP in percent from an evaluated COCOeval, over ``images`` (0-based, repeats allowed: a
    bootstrap resample) or all of them. A resample reuses evaluate()'s per-image matches: it
    reorders COCOeval.evalImgs (laid out class-major, then area range, then image) under new
    image ids, so accumulate() sees each drawn image once per draw.
    tests/test_detection.py holds this equal to scoring the resampled images from scratch."""
    if evaluation is None:
        return 0.0
    if images is not None:
        evaluation = copy.copy(evaluation)
        base, params = evaluation._paramsEval, evaluation.params
        count, areas = len(base.imgIds), len(base.areaRng)
        evaluation.evalImgs = [
            evaluation.evalImgs[(k * areas + a) * count + i]
            for k in range(len(base.catIds))
            for a in range(areas)
            for i in images
        ]
        evaluation.params, evaluation._paramsEval = copy.copy(params), copy.copy(base)
        evaluation.params.imgIds = evaluation._paramsEval.imgIds = list(range(1, len(images) + 1))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation.accumulate()
    precision = evaluation.eval["precision"][:, :, :, 0, -1]  # [IoU, recall, class]
    found = precision[precision > -1]
    return 100.0 * float(found.mean()) if found.size else 0.0


def coco_map(predictions: list[dict], truth: list[dict], classes: int, iou: str = "0.5") -> float:
    """pycocotools' mAP (percent) of per-image predictions against per-image truth (normalised xyxy)."""
    return _accumulated(_evaluated(predictions, truth, classes, iou))
