"""The evaluation protocol (method-notes 6) over an MVTec-layout root, streamed batch by batch.

For every category's test split: run :class:`dzad.model.DZAD`, accumulate image and pixel metrics
(:class:`dzad.metrics.MetricAccumulator` holds the only in-memory copy of the maps), score the
controls (issue 9) on the same images with the same metric code, and write to ``out_dir``:

- ``metrics.json``: ``{"categories": {cat: {metric: v}}, "mean": {...}, "variants":
  {"map_score" | "detection_score" | "fusion": {"categories", "mean"}}, "controls": {name: {"label",
  "categories", "mean"}}, "skipped": {...}, "counts": {...}, "protocol": {...}}`` (the layout
  ``dzad.reports`` reads); NaN is written as null and every null is explained under ``skipped``
  (e.g. pixel metrics of a category whose defect images lack masks: image metrics only);
- ``metrics.csv`` (one row per method and category, plus ``mean``), ``scores.csv`` (one row per
  image), ``noise_features.npz`` (F per image with labels, categories and the calibration needed to
  rescore F under another weighting without running the model);
- ``figures/<category>_roc.png`` and ``figures/<category>_heatmaps.png``;
- with ``save_maps``: ``maps/<category>.npy`` ``(n, H, W)`` float32, rows in ``scores.csv`` order.

Fusion (:func:`dzad.scoring.rank_fusion`, no labels used) ranks each image's map and detection
scores among those of the held-out SOURCE normals stored in the calibration. Where the model cannot
use them (none stored, or other map settings than at calibration) it ranks among all test images of
the category instead, so it never depends on the batch size; ``protocol.fusion_reference`` says
which. Every file is written atomically.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dzad.anomaly_map import scaled
from dzad.backbones import Backbone, build_backbone
from dzad.config import DatasetRef, EvalConfig
from dzad.controls import Control, build_control
from dzad.data.dataset import ImageDataset, Sample, iter_samples, list_categories
from dzad.errors import DZADInputError
from dzad.io_utils import atomic_path, atomic_write_bytes, atomic_write_text
from dzad.metrics import IMAGE_METRICS, PIXEL_METRICS, MetricAccumulator, image_metrics, macro_mean
from dzad.model import DZAD
from dzad.reports import Extremes, plot_roc_curves
from dzad.scoring import rank_fusion

log = logging.getLogger(__name__)

SCORE_COLUMNS = (
    "path",
    "category",
    "label",
    "defect",
    "image_score",
    "map_score",
    "detection_score",
    "fused_score",
    "decision",
)
METRICS = (*IMAGE_METRICS, *PIXEL_METRICS)
# every image score the forward returns, reported beside the configured one (anomaly_map.fusion)
VARIANT_SCORES = (
    ("map_score", "map_score"),
    ("detection_score", "detection_score"),
    ("fusion", "fused_score"),
)
TRIVIAL_CONTROLS = ("mean_intensity", "laplacian")
FEATURE_CONTROLS = ("feature_mean", "feature_knn")
N_EXTREMES = 4  # images per row of the best/worst heat-map grid


# ------------------------------------------------------------------------------------ controls
def control_backbone(model: DZAD) -> Backbone:
    """The backbone the model's maps use (feature controls must share it)."""
    if model.backbone is not None:
        return model.backbone
    encoder_backbone = getattr(model.encoder, "backbone", None)
    if isinstance(encoder_backbone, Backbone):
        return encoder_backbone
    cfg = model.cfg.anomaly_map
    return build_backbone(cfg.backbone, random_weights=cfg.random_backbone)


def source_batches(
    refs: Sequence[DatasetRef], image_size: int, data_cfg, batch_size: int
) -> Iterator[torch.Tensor]:
    """SOURCE-normal images (``train/good`` of each ref's categories) as ``(B,3,S,S)`` batches."""
    samples: list[Sample] = []
    for ref in refs:
        for cat in ref.categories or list_categories(ref.root):
            samples += list(iter_samples(ref.root, cat, "train", skip_bad=data_cfg.skip_bad))
    if not samples:
        raise DZADInputError(refs[0].root if refs else ".", "no SOURCE train/good images")
    ds = ImageDataset(samples, image_size, data_cfg)
    for start in range(0, len(ds), batch_size):
        yield torch.stack([ds[i]["image"] for i in range(start, min(start + batch_size, len(ds)))])


def build_controls(
    model: DZAD, eval_cfg: EvalConfig, source: Callable[[], Iterable[torch.Tensor]]
) -> list[Control]:
    """The issue-9 controls, fitted on SOURCE normals (``source()`` yields fresh batches).

    Mutual scoring is added only for the transductive ("batch zero-shot") gating.
    """
    names = [*TRIVIAL_CONTROLS, *FEATURE_CONTROLS]
    if model.cfg.anomaly_map.gating == "transductive":
        names.append("mutual")
    backbone = control_backbone(model)
    sigma = scaled(model.cfg.anomaly_map.sigma, model.image_size)
    controls = [build_control(n, eval_cfg, backbone, sigma) for n in names]
    for c in controls:
        if c.name in FEATURE_CONTROLS:
            c.fit(source())
    return controls


# ---------------------------------------------------------------------------------- evaluation
@dataclass
class _CategoryRun:
    """Streams one category: metric accumulators, rows, F, extremes."""

    controls: dict[str, MetricAccumulator]
    dzad: MetricAccumulator = field(default_factory=MetricAccumulator)
    rows: list[dict[str, Any]] = field(default_factory=list)
    F: list[np.ndarray] = field(default_factory=list)
    extremes: Extremes = field(default_factory=lambda: Extremes(N_EXTREMES))
    held: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # transductive
    pixel: bool = True  # every defect image has a mask: pixel metrics; else image metrics only

    def add(self, name: str | None, labels, scores, masks, maps) -> None:
        """Accumulate DZAD (``name`` None) or a control; maps count only when ``pixel``."""
        acc = self.dzad if name is None else self.controls[name]
        pixel = self.pixel and maps is not None
        acc.add(labels, scores, masks if pixel else None, maps if pixel else None)


def _select(samples: list[Sample], max_images: int, seed: int) -> list[Sample]:
    """All samples, or a seeded subset of ``max_images`` kept in listing order."""
    if not 0 < max_images < len(samples):
        return samples
    keep = np.random.default_rng(seed).choice(len(samples), max_images, replace=False)
    return [samples[i] for i in sorted(keep)]


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    return x


def _why_undefined(n_good: int, n_defect: int, defect_pixels: int, no_mask: int) -> dict[str, str]:
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


def _run_category(
    model: DZAD,
    ds: ImageDataset,
    eval_cfg: EvalConfig,
    controls: Sequence[Control],
    maps_out: np.ndarray | None,
    progress: Callable[[int], None] | None,
) -> tuple[_CategoryRun, int]:
    pixel = all(s.mask_path is not None for s in ds.samples if s.label == 1)
    run = _CategoryRun({c.name: MetricAccumulator() for c in controls}, pixel=pixel)
    defect_pixels = 0
    for start in range(0, len(ds), eval_cfg.batch_size):
        items = [ds[i] for i in range(start, min(start + eval_cfg.batch_size, len(ds)))]
        images = torch.stack([it["image"] for it in items])  # (B,3,S,S)
        masks = torch.stack([it["mask"] for it in items])  # (B,1,S,S)
        labels = torch.tensor([it["label"] for it in items])
        out = model(images)
        maps = out.anomaly_map.float().cpu()  # (B,1,S,S)
        run.add(None, labels, out.map_score.cpu(), masks, maps)
        defect_pixels += int(masks.sum())
        if maps_out is not None:
            maps_out[start : start + len(items)] = maps[:, 0].numpy()
        run.F.append(out.F.float().cpu().numpy())
        for i, it in enumerate(items):
            run.rows.append(
                {
                    "path": it["path"],
                    "category": it["category"],
                    "label": int(it["label"]),
                    "defect": it["defect"],
                    "image_score": float(out.image_score[i]),
                    "map_score": float(out.map_score[i]),
                    "detection_score": float(out.detection_score[i]),
                    "fused_score": float(out.fused_score[i]),
                    "decision": "anomalous" if bool(out.decision[i]) else "normal",
                }
            )
            run.extremes.add(
                float(out.map_score[i]),
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


def _finish_scores(model: DZAD, rows: list[dict[str, Any]]) -> None:
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


def _drop_unreadable(ds: ImageDataset) -> list[str]:
    """``skip_bad``: decode every item once, drop (and log) the unreadable ones; their messages."""
    keep, dropped = [], []
    for i, sample in enumerate(ds.samples):
        try:
            ds[i]
            keep.append(sample)
        except DZADInputError as exc:
            log.warning("skipped: %s", exc)
            dropped.append(str(exc))
    ds.samples = keep
    return dropped


def category_samples(root: Path, category: str, eval_cfg: EvalConfig, seed: int, skip_bad: bool):
    """The test samples of one category (seeded subset when ``eval_cfg.max_images``); defect
    images without a mask are kept (``mask_path`` None: the category gets image metrics only)."""
    samples = list(
        iter_samples(root, category, "test", skip_bad=skip_bad, allow_missing_masks=True)
    )
    return _select(samples, eval_cfg.max_images, seed)


def evaluate(
    model: DZAD,
    root: str | Path,
    categories: Sequence[str],
    out_dir: str | Path,
    eval_cfg: EvalConfig,
    controls: Sequence[Control] | None = None,
    *,
    save_maps: bool = False,
    skip_bad: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on the test split of ``categories`` (empty = all) under ``root``.

    ``controls``: fitted controls (:func:`build_controls`) or None (no controls section).
    ``progress(n)`` is called after each batch of ``n`` images. Returns the ``metrics.json`` data.
    """
    root, out_dir = Path(root), Path(out_dir)
    cats = list(categories) or list_categories(root)
    data_cfg = replace(model.cfg.data, skip_bad=False)  # unreadable files: _drop_unreadable
    controls = list(controls or [])
    per_cat: dict[str, dict[str, float]] = {}
    variants: dict[str, dict[str, dict[str, float]]] = {name: {} for name, _ in VARIANT_SCORES}
    ctrl: dict[str, dict[str, dict[str, float]]] = {c.name: {} for c in controls}
    skipped: dict[str, Any] = {"categories": {}, "metrics": {}, "files": []}
    counts: dict[str, dict[str, int]] = {}
    rows: list[dict[str, Any]] = []
    f_parts: list[np.ndarray] = []
    for cat in cats:
        samples = category_samples(root, cat, eval_cfg, model.cfg.seed, skip_bad)
        ds = ImageDataset(samples, model.image_size, data_cfg)
        if skip_bad:
            skipped["files"] += _drop_unreadable(ds)
        if len(ds) == 0:
            skipped["categories"][cat] = "no test images"
            continue
        n_defect = sum(s.label for s in ds.samples)
        maps_path = out_dir / "maps" / f"{cat}.npy"
        with atomic_path(maps_path) if save_maps else contextlib.nullcontext() as tmp:
            maps_out = None
            if tmp is not None:
                shape = (len(ds), model.image_size, model.image_size)
                maps_out = np.lib.format.open_memmap(tmp, "w+", np.float32, shape)
            run, defect_pixels = _run_category(model, ds, eval_cfg, controls, maps_out, progress)
            if maps_out is not None:
                maps_out.flush()
                del maps_out
        _finish_scores(model, run.rows)
        labels = np.array([r["label"] for r in run.rows])
        metrics = run.dzad.result()
        if not run.pixel:  # null, explained under skipped
            metrics.update(dict.fromkeys(PIXEL_METRICS, math.nan))
        final = np.array([r["image_score"] for r in run.rows])
        metrics.update(image_metrics(labels, final))  # the configured image score
        per_cat[cat] = metrics
        for name, key in VARIANT_SCORES:
            variants[name][cat] = image_metrics(labels, np.array([r[key] for r in run.rows]))
        for c in controls:
            ctrl[c.name][cat] = run.controls[c.name].result()
        counts[cat] = {"images": len(ds), "good": len(ds) - n_defect, "defect": n_defect}
        no_mask = sum(s.label == 1 and s.mask_path is None for s in ds.samples)
        reasons = _why_undefined(len(ds) - n_defect, n_defect, defect_pixels, no_mask)
        if reasons:
            skipped["metrics"][cat] = reasons
        if eval_cfg.figures:
            _figures(out_dir / "figures", cat, labels, run, model)
        rows += run.rows
        f_parts += run.F
    if not per_cat:
        raise DZADInputError(root, f"no test images in any of the categories {cats}")
    result = _assemble(per_cat, variants, ctrl, controls, skipped, counts)
    result["protocol"] = {
        "data": str(root),
        "image_size": model.image_size,
        "fusion": model.cfg.anomaly_map.fusion,
        "gating": model.cfg.anomaly_map.gating,
        "gating_label": "batch zero-shot"
        if model.cfg.anomaly_map.gating == "transductive"
        else "zero-shot",
        "max_images": eval_cfg.max_images,
        "detection": model.cfg.detection.mode,
        "backbone": model.cfg.anomaly_map.backbone,
        "random_backbone": model.cfg.anomaly_map.random_backbone,
        "fusion_reference": _fusion_reference(model),
    }
    _write_outputs(out_dir, result, rows, f_parts, model)
    return result


def _fusion_reference(model: DZAD) -> str:
    problem = model.reference_problem()
    if problem is None:
        n = len(model.calibration.ref_map)  # type: ignore[arg-type]
        return f"SOURCE normals ({n} held-out images)"
    return f"test images of the category ({problem})"


def _mean_without_skipped(per_cat: dict[str, dict[str, float]]) -> dict[str, float]:
    mean = macro_mean(per_cat)
    mean.pop("skipped", None)
    return mean


def _assemble(per_cat, variants, ctrl, controls, skipped, counts) -> dict:
    labels = {c.name: c.label for c in controls}
    return _nan_to_none(
        {
            "categories": per_cat,
            "mean": _mean_without_skipped(per_cat),
            "variants": {
                name: {"categories": v, "mean": _mean_without_skipped(v)}
                for name, v in variants.items()
                if v
            },
            "controls": {
                name: {"label": labels[name], "categories": v, "mean": _mean_without_skipped(v)}
                for name, v in ctrl.items()
                if v
            },
            "skipped": skipped,
            "counts": counts,
        }
    )


def metrics_frame(result: dict[str, Any]) -> pd.DataFrame:
    """One row per (method, category) plus each method's ``mean`` row; NaN where undefined."""
    methods = {"dzad": result}
    methods.update({f"dzad: {k}": v for k, v in result["variants"].items()})
    methods.update({v["label"]: v for v in result["controls"].values()})
    records = []
    for method, block in methods.items():
        for cat, values in [*block["categories"].items(), ("mean", block["mean"])]:
            rec = {"method": method, "category": cat}
            rec.update({m: values.get(m) for m in METRICS})
            records.append(rec)
    return pd.DataFrame.from_records(records, columns=["method", "category", *METRICS])


def _figures(folder: Path, cat: str, labels: np.ndarray, run: _CategoryRun, model: DZAD) -> None:
    curves = {
        "DZAD map": (labels, np.array([r["map_score"] for r in run.rows])),
        "detection score": (labels, np.array([r["detection_score"] for r in run.rows])),
        "fusion": (labels, np.array([r["fused_score"] for r in run.rows])),
    }
    plot_roc_curves(curves, folder / f"{cat}_roc.png", title=f"{cat}: image-level ROC")
    gate = model.cfg.anomaly_map.gating
    run.extremes.plot(
        folder / f"{cat}_heatmaps.png",
        f"{cat}: highest / lowest map scores (gating {gate}; cyan = ground truth)",
    )


def _write_outputs(
    out_dir: Path, result: dict, rows: list[dict], f_parts: list[np.ndarray], model: DZAD
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = pd.DataFrame.from_records(rows, columns=list(SCORE_COLUMNS))
    atomic_write_text(out_dir / "scores.csv", scores.to_csv(index=False))
    atomic_write_text(out_dir / "metrics.csv", metrics_frame(result).to_csv(index=False))
    calib = model.calibration
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        F=np.concatenate(f_parts).astype(np.float32),
        label=scores["label"].to_numpy(np.int64),
        category=scores["category"].to_numpy(str),
        path=scores["path"].to_numpy(str),
        detection_score=scores["detection_score"].to_numpy(np.float64),
        stage_mean=calib.stage_mean.cpu().numpy(),
        stage_std=calib.stage_std.cpu().numpy(),
        weights=calib.weights.cpu().numpy(),
        bias=np.float64(calib.bias),
        standardise=np.bool_(calib.standardise),
        alphas_cumprod=model.alphas_cumprod.cpu().numpy(),
    )
    atomic_write_bytes(out_dir / "noise_features.npz", buf.getvalue())
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=1, allow_nan=False))
