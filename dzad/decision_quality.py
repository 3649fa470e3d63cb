"""How good the written decisions are, measured where labels exist (``dzad evaluate``).

AUROC and AUPRO rank the images and pixels over every threshold; an inspector acts on one. Each
regime decides without the target's labels: per image (zero-shot) by the SOURCE-calibrated tau and
map threshold (:mod:`dzad.decisions`, docs/method.md §7); in batch zero-shot and few-shot by
:func:`dzad.regimes.image_rule` and :func:`dzad.regimes.map_level` (§11.1). An image's decision is
its ``scores.csv`` ``decision``; a pixel is in the predicted region (``--save-masks``, the
pictures' contour) above the map threshold. :class:`DecisionCounts` counts both against the labels
and masks over the batches of one category (one reference draw in few-shot);
:meth:`DecisionCounts.result` gives precision, recall and F1 of the image decisions and of the
region, and the region's IoU with the defect pixels (every pixel of the category pooled, as pixel
AUROC pools them). A value with nothing to divide
by (nothing flagged: precision; no defect: recall) is NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DECISIONS_LABEL = (
    "the decisions written to scores.csv against the labels, and the predicted region (the "
    "pictures' contour, --save-masks) against the masks (dzad.decision_quality)"
)
DECISION_METRICS = (
    "image_precision", "image_recall", "image_f1", "images_flagged",
    "pixel_precision", "pixel_recall", "pixel_f1", "pixel_iou",
)  # fmt: skip


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def _quality(tp: int, fp: int, fn: int) -> tuple[float, float, float, float]:
    """Precision, recall, F1 and IoU of ``tp`` true, ``fp`` false and ``fn`` missed positives."""
    return (
        _ratio(tp, tp + fp),
        _ratio(tp, tp + fn),
        _ratio(2 * tp, 2 * tp + fp + fn),
        _ratio(tp, tp + fp + fn),
    )


def _counts(truth: Tensor, predicted: Tensor) -> tuple[int, int, int]:
    truth, predicted = truth.bool(), predicted.bool()
    tp = int((truth & predicted).sum())
    return tp, int((~truth & predicted).sum()), int((truth & ~predicted).sum())


def _plus(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


@dataclass
class DecisionCounts:
    """True / false / missed positives of the image decisions and of the predicted region."""

    image: tuple[int, int, int] = (0, 0, 0)
    pixel: tuple[int, int, int] = (0, 0, 0)

    def add(
        self, labels: Tensor, flagged: Tensor, masks: Tensor | None = None,
        maps: Tensor | None = None, level: float | None = None,
    ) -> None:  # fmt: skip
        """One scored batch: ``labels`` / ``flagged`` ``(n,)`` (1 / True = defective /
        anomalous); ``masks`` / ``maps`` ``(n,1,S,S)``, the predicted region being ``maps >
        level``. No pixels count where the category has no masks or there is no ``level``."""
        self.image = _plus(self.image, _counts(labels, flagged))
        if masks is not None and maps is not None and level is not None:
            self.pixel = _plus(self.pixel, _counts(masks > 0.5, maps > level))

    def result(self) -> dict[str, float]:
        """:data:`DECISION_METRICS`; the pixel ones NaN when no pixels were counted."""
        ip, ir, i_f1, _ = _quality(*self.image)
        flagged = self.image[0] + self.image[1]
        values = (ip, ir, i_f1, float(flagged), *_quality(*self.pixel))
        return dict(zip(DECISION_METRICS, values, strict=True))


def flagged_rows(rows: list[dict]) -> Tensor:
    """``(n,)`` bool: which ``scores.csv`` rows the image rule decided ``anomalous``."""
    return torch.tensor([r["decision"] == "anomalous" for r in rows], dtype=torch.bool)
