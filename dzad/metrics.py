"""Detection and segmentation metrics: the one vetted implementation (docs/method.md §11).

Image level: AUROC, average precision (AP, scikit-learn's step-wise definition) and F1-max.
Pixel level: AUROC, F1-max and AUPRO (mean per-region overlap integrated over FPR in [0, 0.3],
the curve interpolated at 0.3, divided by 0.3). Metrics are computed per category; ``macro_mean``
averages categories. An AUC below 0.5 is reported as it is, never flipped.

All of them come from one exact rank statistic. Positives (defect images / defect pixels) are
sorted once; negatives are sorted once without an argsort (``np.sort`` of ``float32`` is SIMD-fast)
and each distinct positive value is located among them with ``np.searchsorted``. Between two
consecutive distinct positive values only false positives change, so the ROC / PRO curve through
every distinct threshold is fully described by the points at those values (plus the horizontal
run before each); nothing is binned or approximated. Memory is ~12 bytes per pixel.
scikit-learn's ``roc_auc_score`` / ``average_precision_score`` give the same image-level numbers
(``tests/test_metrics.py`` checks them against these), but are not used: the pixel metrics and
AUPRO need this rank statistic anyway (sklearn argsorts float64 copies of every pixel score), and
one implementation for both levels keeps image and pixel numbers consistent.

A metric that is undefined for the data (one class only, no defect region) is NaN and the reason
is logged with ``logging.warning``; it is never a crash or a silent 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

log = logging.getLogger(__name__)

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_f1max", "aupro")
AUPRO_FPR_LIMIT = 0.3


def _numpy(x: np.ndarray | torch.Tensor, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(dtype, copy=False)


@dataclass(frozen=True)
class _RankCurve:
    """Counts at each distinct positive score ``v`` (descending): ``tp`` positives ``>= v``,
    ``fp_ge`` / ``fp_gt`` negatives ``>= v`` / ``> v``, ``w`` summed positive weight ``>= v``."""

    tp: np.ndarray
    fp_ge: np.ndarray
    fp_gt: np.ndarray
    w: np.ndarray
    n_pos: int
    n_neg: int


def _rank_curve(pos: np.ndarray, neg: np.ndarray, weight: np.ndarray | None = None) -> _RankCurve:
    """Exact rank statistics of positive scores ``pos`` (P,) against negative scores ``neg`` (Q,).

    ``neg`` is sorted in place (callers pass a private copy).
    """
    order = np.argsort(pos)[::-1]
    pos_sorted = pos[order]
    ends = np.flatnonzero(pos_sorted[1:] != pos_sorted[:-1])
    ends = np.append(ends, pos_sorted.size - 1)  # last index of each group of equal scores
    values = pos_sorted[ends]
    neg.sort()
    n_neg = neg.size
    ascending = values[::-1]
    fp_ge = n_neg - np.searchsorted(neg, ascending, side="left")[::-1]
    fp_gt = n_neg - np.searchsorted(neg, ascending, side="right")[::-1]
    w = np.zeros(0) if weight is None else np.cumsum(weight[order], dtype=np.float64)[ends]
    return _RankCurve(ends + 1, fp_ge, fp_gt, w, pos.size, n_neg)


def _auroc(c: _RankCurve) -> float:
    """Mann-Whitney form of the trapezoidal ROC area: P(s+ > s-) + P(s+ = s-) / 2."""
    group = np.diff(c.tp, prepend=0)
    below = c.n_neg - c.fp_ge  # negatives strictly below the group's score
    ties = c.fp_ge - c.fp_gt
    return float(np.sum(group * (below + 0.5 * ties)) / (c.n_pos * c.n_neg))


def _average_precision(c: _RankCurve) -> float:
    """scikit-learn's AP: sum over thresholds of (R_k - R_{k-1}) * P_k."""
    precision = c.tp / (c.tp + c.fp_ge)
    return float(np.sum(np.diff(c.tp, prepend=0) / c.n_pos * precision))


def _f1max(c: _RankCurve) -> float:
    """max over thresholds of 2TP / (2TP + FP + FN); only positive values can be the argmax."""
    return float(np.max(2 * c.tp / (c.tp + c.fp_ge + c.n_pos)))


def _area_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline (x non-decreasing) from x[0] to ``limit``, interpolated."""
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    c0, c1 = np.minimum(x0, limit), np.minimum(x1, limit)
    dx = x1 - x0
    frac = np.divide(c1 - x0, dx, out=np.zeros_like(dx), where=dx > 0)
    y_end = y0 + np.clip(frac, 0.0, 1.0) * (y1 - y0)
    return float(np.sum((c1 - c0) * (y0 + y_end) / 2))


def _aupro(c: _RankCurve, limit: float) -> float:
    """PRO-vs-FPR curve through every distinct threshold, area to FPR ``limit`` / ``limit``.

    Each positive value v contributes two vertices: (FPR(> v), PRO before v) ends the horizontal
    run of negatives above v, and (FPR(>= v), PRO(>= v)) is v itself (a slanted step when negatives
    tie with v). The curve starts at (0, 0) and ends at (1, 1).
    """
    pro_before = np.concatenate([[0.0], c.w[:-1]])
    fpr = np.stack([c.fp_gt, c.fp_ge], axis=1).reshape(-1) / c.n_neg
    pro = np.stack([pro_before, c.w], axis=1).reshape(-1)
    x = np.concatenate([[0.0], fpr, [1.0]])
    y = np.concatenate([[0.0], pro, [1.0]])
    return _area_to(x, y, limit) / limit


def _undefined(names: tuple[str, ...], reason: str) -> dict[str, float]:
    log.warning("%s undefined (NaN): %s", "/".join(names), reason)
    return dict.fromkeys(names, math.nan)


def _check_finite(x: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contain NaN or infinite values")


def image_metrics(
    labels: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor
) -> dict[str, float]:
    """``image_auroc``, ``image_ap``, ``image_f1max`` of labels ``(n,)`` in {0,1}, scores ``(n,)``.

    A higher score means more anomalous. With a single class all three are NaN (warning logged).
    """
    y = _numpy(labels, np.int64).reshape(-1)
    s = _numpy(scores, np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defect)")
    _check_finite(s, "image scores")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        kind = "defect" if n_pos else "good"
        return _undefined(IMAGE_METRICS, f"all {y.size} images are {kind} (one class only)")
    c = _rank_curve(s[y == 1], s[y == 0].copy())
    return {"image_auroc": _auroc(c), "image_ap": _average_precision(c), "image_f1max": _f1max(c)}


def pixel_metrics(
    masks: np.ndarray | torch.Tensor,
    maps: np.ndarray | torch.Tensor,
    fpr_limit: float = AUPRO_FPR_LIMIT,
    connectivity: int = 2,
) -> dict[str, float]:
    """``pixel_auroc``, ``pixel_f1max``, ``aupro`` from masks ``(n,H,W)`` and maps ``(n,H,W)``.

    ``(n,1,H,W)`` is accepted too. Maps are compared as ``float32``. Regions for AUPRO are the
    connected components of each mask (``connectivity=2``: 8-neighbourhood, as MVTec's reference
    evaluation); normal pixels of every image (good ones included) define the FPR.
    """
    m = _numpy(masks, bool)
    a = _numpy(maps, np.float32)
    if m.ndim == 4:
        m = m[:, 0]
    if a.ndim == 4:
        a = a[:, 0]
    if m.shape != a.shape or m.ndim != 3:
        raise ValueError(f"masks {m.shape} and maps {a.shape} must both be (n, H, W)")
    _check_finite(a, "anomaly maps")
    n_pos = int(m.sum())
    if n_pos == 0 or n_pos == m.size:
        kind = "defect" if n_pos else "normal"
        return _undefined(PIXEL_METRICS, f"all {m.size} pixels are {kind} (one class only)")
    # one label call for the stack; the structure does not connect different images (axis 0)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, connectivity)
    regions, n_regions = ndimage.label(m, structure=structure)
    region_of = regions[m]  # (P,) region id of each defect pixel, 1..K
    del regions
    sizes = np.bincount(region_of)
    weight = 1.0 / (n_regions * sizes[region_of])  # each region counts 1/K, shared by its pixels
    c = _rank_curve(a[m], a[~m], weight)
    return {"pixel_auroc": _auroc(c), "pixel_f1max": _f1max(c), "aupro": _aupro(c, fpr_limit)}


class MetricAccumulator:
    """Streams one category's results batch by batch; ``result()`` computes every metric once.

    Labels/scores are kept as ``(n,)`` arrays, masks as ``bool`` and maps as ``float32``
    ``(n,H,W)`` (one copy each; nothing is kept in float64). Pass masks and maps for every batch
    or for none.
    """

    def __init__(self, fpr_limit: float = AUPRO_FPR_LIMIT) -> None:
        self.fpr_limit = fpr_limit
        self._labels: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._maps: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(x.size for x in self._labels)

    def add(self, labels, scores, masks=None, maps=None) -> None:
        """labels ``(B,)``, scores ``(B,)``, masks/maps ``(B,1,H,W)`` or ``(B,H,W)`` or None."""
        y = _numpy(labels, np.int64).reshape(-1)
        s = _numpy(scores, np.float64).reshape(-1)
        if y.shape != s.shape:
            raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
        if (masks is None) != (maps is None):
            raise ValueError("pass masks and maps together")
        if self._labels and (masks is None) != (not self._maps):
            raise ValueError("masks/maps must be given for every batch or for none")
        if masks is not None:
            m = _numpy(masks, bool)
            a = _numpy(maps, np.float32)
            m, a = m.reshape(y.size, *m.shape[-2:]), a.reshape(y.size, *a.shape[-2:])
            if m.shape != a.shape:
                raise ValueError(f"masks {m.shape} and maps {a.shape} differ")
            self._masks.append(m)
            self._maps.append(a)
        self._labels.append(y)
        self._scores.append(s)

    def result(self) -> dict[str, float]:
        """Image metrics, plus pixel metrics when maps were added."""
        if not self._labels:
            raise ValueError("MetricAccumulator.result() called before any add()")
        out = image_metrics(np.concatenate(self._labels), np.concatenate(self._scores))
        if self._maps:
            # collapse to one array each so the data is never held twice after this call
            self._masks = [np.concatenate(self._masks)]
            self._maps = [np.concatenate(self._maps)]
            out.update(pixel_metrics(self._masks[0], self._maps[0], self.fpr_limit))
        return out


def macro_mean(per_category: Mapping[str, Mapping[str, float]]) -> dict:
    """Mean of each metric over categories, ignoring NaN.

    Returns ``{metric: mean, ..., "skipped": {metric: [categories with NaN]}}``; a metric that is
    NaN everywhere stays NaN (warning logged).
    """
    names: list[str] = []
    for values in per_category.values():
        names += [k for k in values if k not in names]
    out: dict = {}
    skipped: dict[str, list[str]] = {}
    for name in names:
        got = {c: v.get(name, math.nan) for c, v in per_category.items()}
        finite = [float(v) for v in got.values() if not math.isnan(v)]
        missing = [c for c, v in got.items() if math.isnan(v)]
        if missing:
            skipped[name] = missing
        if not finite:
            log.warning("macro mean of %s undefined: NaN in every category", name)
        out[name] = float(np.mean(finite)) if finite else math.nan
    out["skipped"] = skipped
    return out
