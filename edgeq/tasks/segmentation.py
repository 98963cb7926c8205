"""Semantic segmentation: the per-pixel class map an app draws, and the mIoU a segmenter recipe scores with.

A segmenter's raw output is ``[B, classes, H, W]`` logits. The app turns it into a
mask (one class per pixel, the argmax over classes); :class:`SegmentationMasks`
is the Python reference of that step, and the bundle's ``Segmentation.java``
implements the same from the manifest's parameters (ties go to the lowest
class index in both, as ``torch.argmax`` does). :class:`MeanIoU` is the
Jaccard index of torchmetrics (``multiclass_jaccard_index``, macro average over
the classes that occur), never hand-written here; its bootstrap reuses one
confusion matrix per image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from edgeq.errors import EdgeqError

__all__ = ["MeanIoU", "SegmentationMasks"]


def _torchmetrics() -> Any:
    try:
        from torchmetrics.functional import classification
    except ImportError as exc:
        raise EdgeqError("the mIoU metric needs torchmetrics", "pip install 'edgeq[vision]'") from exc
    return classification


@dataclass(frozen=True)
class SegmentationMasks:
    """``[B, classes, H, W]`` logits (or probabilities) -> ``[B, H, W]`` class indices."""

    classes: int
    #: the target value that marks unlabelled pixels (void), ignored by the metric; None: every pixel counts
    ignore_index: int | None = None

    task = "segmentation"

    def __post_init__(self) -> None:
        if self.classes < 2:
            raise EdgeqError(f"SegmentationMasks with classes={self.classes}", "a segmenter has 2 or more classes")

    def check(self, output: torch.Tensor) -> None:
        if output.dim() != 4 or output.shape[1] != self.classes:
            raise EdgeqError(
                f"SegmentationMasks expects [B, {self.classes}, H, W] class scores, got shape {tuple(output.shape)}",
                "set classes to the model's class count, or return the per-pixel scores before any argmax",
            )

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        self.check(output)
        return output.detach().argmax(dim=1)

    def manifest(self) -> dict[str, Any]:
        return {"decoder": "argmax", "classes": self.classes, "ignore_index": self.ignore_index}

    def distillation_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """KL divergence to the float model's per-pixel class distribution: the loss QAT and the
        held-out selection use for a segmenter (a per-channel MSE would weigh a confident pixel's
        large logits over the decisions that change the mask)."""
        s = student.float().movedim(1, -1).flatten(0, -2).log_softmax(-1)
        t = teacher.float().movedim(1, -1).flatten(0, -2).log_softmax(-1)
        return torch.nn.functional.kl_div(s, t, reduction="batchmean", log_target=True)


def _targets(targets: Any) -> torch.Tensor:
    if isinstance(targets, torch.Tensor):
        return targets
    return torch.stack([torch.as_tensor(t) for t in targets])


class MeanIoU:
    """Mean intersection over union (percent) of the argmax masks against per-pixel class targets
    ``[B, H, W]`` (a tensor, or one mask per image), averaged over the classes present in either.
    Targets shaped like the outputs are a teacher's class scores (training data distilled from the
    float model): their argmax masks are the truth, as the held-out decisions score them."""

    def __init__(self, masks: SegmentationMasks) -> None:
        self.masks = masks

    def _truth(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        self.masks.check(outputs)
        truth = _targets(targets)
        if truth.shape == outputs.shape and truth.is_floating_point():
            return self.masks(truth)
        if truth.shape != (outputs.shape[0], *outputs.shape[2:]):
            raise EdgeqError(
                f"mIoU: targets of shape {tuple(truth.shape)} for outputs {tuple(outputs.shape)}",
                "give one [H, W] mask per image at the output's resolution (resize labels with nearest)",
            )
        return truth.long()

    def __call__(self, outputs: torch.Tensor, targets: Any) -> float:
        truth = self._truth(outputs, targets)
        value = _torchmetrics().multiclass_jaccard_index(
            self.masks(outputs), truth, self.masks.classes, average="macro", ignore_index=self.masks.ignore_index
        )
        return 100.0 * float(value)

    def confusion(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """One confusion matrix per image, ``[B, classes, classes]`` (rows: truth)."""
        truth = self._truth(outputs, targets)
        predicted = self.masks(outputs)
        confusion = _torchmetrics().multiclass_confusion_matrix
        return torch.stack(
            [
                confusion(p, t, self.masks.classes, ignore_index=self.masks.ignore_index, validate_args=False)
                for p, t in zip(predicted, truth)
            ]
        )

    def resampler(self, outputs: torch.Tensor, targets: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """mIoU on each row of the indices it is given (bootstrap resamples of the images), from the
        per-image confusion matrices computed here, once: tests/test_segmentation.py holds it equal
        to torchmetrics on the images."""
        per_image = self.confusion(outputs, targets).double()

        def score(indices: torch.Tensor) -> torch.Tensor:
            totals = torch.stack([per_image[row].sum(0) for row in indices])
            return 100.0 * _macro_iou(totals, self.masks.ignore_index)

        return score

    def resampled(self, outputs: torch.Tensor, targets: Any, indices: torch.Tensor) -> torch.Tensor:
        """:meth:`resampler`, prepared and applied to ``indices`` in one call."""
        return self.resampler(outputs, targets)(indices)


def _macro_iou(confusion: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """IoU per class from ``[..., C, C]`` confusion matrices, averaged over classes with a non-empty
    union (torchmetrics' macro average), the ignored class left out."""
    hits = confusion.diagonal(dim1=-2, dim2=-1)
    union = confusion.sum(-1) + confusion.sum(-2) - hits
    present = union > 0
    if ignore_index is not None and 0 <= ignore_index < confusion.shape[-1]:
        present[..., ignore_index] = False
    iou = torch.where(present, hits / union.clamp(min=1), torch.zeros_like(hits))
    return iou.sum(-1) / present.sum(-1).clamp(min=1)
