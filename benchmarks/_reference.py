"""Slow, obviously-correct AUPRO by a threshold sweep: a reference for verification only.

Used by ``tests/test_metrics.py`` and ``benchmarks/aupro.py`` to check
``dzad.metrics.pixel_metrics``; the library never calls it. It binarises the maps at every
distinct value, measures the FPR on normal pixels and the overlap of each connected defect region
(8-neighbourhood) one region at a time, and integrates the PRO-vs-FPR polyline (starting at
(0, 0)) up to ``fpr_limit`` with the last segment cut by linear interpolation. Cost:
O(levels x pixels), so use maps with few distinct values.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def aupro_reference(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """AUPRO of maps ``(n, H, W)`` against boolean masks ``(n, H, W)`` (normalised by fpr_limit)."""
    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=np.float32)
    eight = np.ones((3, 3), dtype=bool)
    regions: list[tuple[int, np.ndarray]] = []  # (image index, flat pixel indices of one region)
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=eight)
        for k in range(1, count + 1):
            regions.append((i, np.flatnonzero(labelled == k)))
    normal = ~masks
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fpr = predicted[normal].mean()
        overlaps = [predicted[i].reshape(-1)[idx].mean() for i, idx in regions]
        points.append((float(fpr), float(np.mean(overlaps))))
    points.sort()
    fprs = np.array([p[0] for p in points])
    pros = np.array([p[1] for p in points])
    inside = fprs <= fpr_limit
    x, y = fprs[inside], pros[inside]
    if x[-1] < fpr_limit:
        j = int(np.argmax(~inside))  # first point beyond the limit
        t = (fpr_limit - fprs[j - 1]) / (fprs[j] - fprs[j - 1])
        x = np.append(x, fpr_limit)
        y = np.append(y, pros[j - 1] + t * (pros[j] - pros[j - 1]))
    return float(np.trapezoid(y, x) / fpr_limit)
