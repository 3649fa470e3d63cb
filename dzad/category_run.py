"""One category's test images streamed through the model and the controls (docs/method.md §11).

:func:`run_category` runs :class:`dzad.model.DZAD` and every control batch by batch on the same
images and accumulates their metrics (:class:`dzad.metrics.MetricAccumulator`), the per-image rows
of ``scores.csv``, the quality of their decisions (:mod:`dzad.decision_quality`), the noise
features F and the best/worst heat maps; :func:`finish_scores` ranks
the fusion within the category when the model has no SOURCE references; :func:`why_undefined`
explains every undefined metric. :func:`dzad.evaluation.evaluate` calls them per category.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dzad.config import EvalConfig
from dzad.controls import Control
from dzad.data.dataset import ImageDataset
from dzad.decision_quality import DecisionCounts
from dzad.decisions import map_threshold
from dzad.metrics import IMAGE_METRICS, PIXEL_METRICS, MetricAccumulator
from dzad.model import DZAD
from dzad.reports import Extremes
from dzad.scoring import rank_fusion

N_EXTREMES = 4  # images per row of the best/worst heat-map grid


@dataclass
class CategoryRun:
    """Streams one category: metric accumulators, rows, F, extremes."""

    controls: dict[str, MetricAccumulator]
    dzad: MetricAccumulator = field(default_factory=MetricAccumulator)
    rows: list[dict[str, Any]] = field(default_factory=list)
    noise_matrices: list[np.ndarray] = field(default_factory=list)  # F of eq. 12 per batch
    extremes: Extremes = field(default_factory=lambda: Extremes(N_EXTREMES))
    held: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # transductive
    pixel: bool = True  # every defect image has a mask: pixel metrics; else image metrics only
    decisions: DecisionCounts = field(default_factory=DecisionCounts)  # the rows' and region's

    def add(self, name: str | None, labels, scores, masks, maps) -> None:
        """Accumulate DZAD (``name`` None) or a control; maps count only when ``pixel``."""
        acc = self.dzad if name is None else self.controls[name]
        pixel = self.pixel and maps is not None
        acc.add(labels, scores, masks if pixel else None, maps if pixel else None)


def why_undefined(n_good: int, n_defect: int, defect_pixels: int, no_mask: int) -> dict[str, str]:
    reasons: dict[str, str] = {}
    if n_good == 0 or n_defect == 0:
        missing = "good (normal)" if n_good == 0 else "defect"
        why = f"no {missing} test images: AUROC/AP/F1 need both classes"
        reasons.update(dict.fromkeys(IMAGE_METRICS, why))
    if no_mask:
        why = f"{no_mask} of {n_defect} defect images have no mask: image metrics only"
        reasons.update(dict.fromkeys(PIXEL_METRICS, why))
    elif defect_pixels == 0:
        reasons.update(dict.fromkeys(PIXEL_METRICS, "no defect pixels in the masks"))
    return reasons


def run_category(
    model: DZAD,
    ds: ImageDataset,
    eval_cfg: EvalConfig,
    controls: Sequence[Control],
    maps_out: np.ndarray | None,
    progress: Callable[[int], None] | None,
) -> tuple[CategoryRun, int]:
    pixel = all(s.mask_path is not None for s in ds.samples if s.label == 1)
    run = CategoryRun({c.name: MetricAccumulator() for c in controls}, pixel=pixel)
    level, _ = map_threshold(model)  # the pictures' region; None: no calibrated one
    defect_pixels = 0
    for start in range(0, len(ds), eval_cfg.batch_size):
        items = [ds[i] for i in range(start, min(start + eval_cfg.batch_size, len(ds)))]
        images = torch.stack([it["image"] for it in items])  # (B,3,S,S)
        masks = torch.stack([it["mask"] for it in items])  # (B,1,S,S)
        labels = torch.tensor([it["label"] for it in items])
        out = model(images)
        maps = out.anomaly_map.float().cpu()  # (B,1,S,S)
        run.add(None, labels, out.map_score.cpu(), masks, maps)
        run.decisions.add(labels, out.decision.cpu(), masks if pixel else None, maps, level)
        defect_pixels += int(masks.sum())
        if maps_out is not None:
            maps_out[start : start + len(items)] = maps[:, 0].numpy()
        run.noise_matrices.append(out.F.float().cpu().numpy())
        # one device->host copy per score and batch (not one sync per image and score)
        image_s, map_s, det_s, fused_s, decision = (
            t.cpu().tolist()
            for t in (
                out.image_score, out.map_score, out.detection_score, out.fused_score, out.decision
            )
        )  # fmt: skip
        for i, it in enumerate(items):
            run.rows.append(
                {
                    "path": it["path"],
                    "category": it["category"],
                    "label": int(it["label"]),
                    "defect": it["defect"],
                    "image_score": float(image_s[i]),
                    "map_score": float(map_s[i]),
                    "detection_score": float(det_s[i]),
                    "fused_score": float(fused_s[i]),
                    "decision": "anomalous" if bool(decision[i]) else "normal",
                }
            )
            run.extremes.add(
                float(map_s[i]),
                images[i].permute(1, 2, 0).numpy(),
                maps[i, 0].numpy(),
                masks[i, 0].numpy() > 0,
                f"{it['defect']}/{Path(it['path']).name}",
            )
        for c in controls:
            if c.transductive:
                continue
            scores, cmaps = c.score(images)
            run.add(c.name, labels, scores.cpu(), masks, cmaps)
        if any(c.transductive for c in controls):
            run.held.append((images, masks))
        if progress is not None:
            progress(len(items))
    for c in controls:
        if c.transductive:  # needs every test image of the category at once
            labels = torch.tensor([r["label"] for r in run.rows])
            masks = torch.cat([m for _, m in run.held])
            scores, cmaps = c.score(torch.cat([x for x, _ in run.held]))
            run.add(c.name, labels, scores, masks, cmaps)
    return run, defect_pixels


def finish_scores(model: DZAD, rows: list[dict[str, Any]]) -> None:
    """Category-level rank fusion (and the image score when it is the fusion), used only when the
    model has no usable SOURCE references (its within-batch ranks depend on the batch size)."""
    if model.fusion_references() is not None:
        return  # the forward ranked every image among the SOURCE normals already
    map_s = torch.tensor([r["map_score"] for r in rows], dtype=torch.float64)
    det_s = torch.tensor([r["detection_score"] for r in rows], dtype=torch.float64)
    fused = rank_fusion(map_s, det_s).tolist()
    for r, f in zip(rows, fused, strict=True):
        r["fused_score"] = float(f)
        if model.cfg.anomaly_map.fusion == "rank":
            r["image_score"] = float(f)
