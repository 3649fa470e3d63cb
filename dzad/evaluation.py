"""The evaluation protocol (docs/method.md §11) over a test set, streamed batch by batch.

For every category's test split: run :class:`dzad.model.DZAD`, accumulate image and pixel metrics
(:class:`dzad.metrics.MetricAccumulator` holds the only in-memory copy of the maps), score the
controls (method.md §11) on the same images with the same metric code, and write to ``out_dir``:

- ``metrics.json``: ``{"categories": {cat: {metric: v}}, "mean": {...}, "variants":
  {"map_score" | "detection_score" | "fusion": {"categories", "mean"}}, "controls": {name: {"label",
  "categories", "mean"}}, "skipped": {...}, "counts": {...}, "protocol": {...}}`` (the layout
  ``dzad.reports`` reads); NaN is written as null and every null is explained under ``skipped``
  (e.g. pixel metrics of a category whose defect images lack masks: image metrics only);
- ``metrics.csv`` (one row per method and category, plus ``mean``), ``scores.csv`` (one row per
  image), ``noise_features.npz`` (F per image with labels, categories and the calibration needed to
  rescore F under another weighting without running the model);
- ``figures/<category>_roc.png``, ``<category>_pr.png`` and ``<category>_heatmaps.png``;
- with ``save_maps``: ``maps/<category>.npy`` ``(n, H, W)`` float32, rows in ``scores.csv`` order;
- with ``pictures``: per-image heat maps, panels and thumbnails and ``report.html``
  (:mod:`dzad.evaluation_pictures`; ``save_masks`` adds ``masks/``).

Fusion (:func:`dzad.scoring.rank_fusion`, no labels used) ranks each image's map and detection
scores among those of the held-out SOURCE normals stored in the calibration. Where the model cannot
use them (none stored, or other map settings than at calibration) it ranks among all test images of
the category instead, so it never depends on the batch size; ``protocol.fusion_reference`` says
which. Every file is written atomically.

One category's streamed run is :mod:`dzad.category_run`; the ``metrics.json`` layout and the
written files are :mod:`dzad.evaluation_outputs`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dzad.anomaly_map import scaled
from dzad.backbones import Backbone, build_backbone
from dzad.category_run import finish_scores, run_category, why_undefined
from dzad.config import DatasetRef, EvalConfig
from dzad.controls import Control, build_control
from dzad.data.dataset import ImageDataset, Sample
from dzad.data.source import source_normals
from dzad.data.test_sets import TestSet, as_test_set
from dzad.decisions import decision_threshold
from dzad.errors import DZADInputError
from dzad.evaluation_outputs import assemble, category_figures, write_outputs
from dzad.evaluation_pictures import EvalPictures
from dzad.io_utils import atomic_path
from dzad.metrics import PIXEL_METRICS, image_metrics
from dzad.model import DZAD

log = logging.getLogger(__name__)

# every image score the forward returns, reported beside the configured one (anomaly_map.fusion)
VARIANT_SCORES = (
    ("map_score", "map_score"),
    ("detection_score", "detection_score"),
    ("fusion", "fused_score"),
)
TRIVIAL_CONTROLS = ("mean_intensity", "laplacian")
FEATURE_CONTROLS = ("feature_mean", "feature_knn")


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
    """SOURCE-normal images (:func:`dzad.data.source.source_normals`) as ``(B,3,S,S)`` batches."""
    ds = ImageDataset(source_normals(refs, skip_bad=data_cfg.skip_bad), image_size, data_cfg)
    for start in range(0, len(ds), batch_size):
        yield torch.stack([ds[i]["image"] for i in range(start, min(start + batch_size, len(ds)))])


def build_controls(
    model: DZAD, eval_cfg: EvalConfig, source: Callable[[], Iterable[torch.Tensor]]
) -> list[Control]:
    """The controls (method.md §11), fitted on SOURCE normals (``source()`` yields fresh batches).

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
def _select(samples: list[Sample], max_images: int, seed: int) -> list[Sample]:
    """All samples, or a seeded subset of ``max_images`` kept in listing order."""
    if not 0 < max_images < len(samples):
        return samples
    keep = np.random.default_rng(seed).choice(len(samples), max_images, replace=False)
    return [samples[i] for i in sorted(keep)]


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


def category_samples(
    data: str | Path | TestSet, category: str, eval_cfg: EvalConfig, seed: int, skip_bad: bool
) -> list[Sample]:
    """The test samples of one category of ``data`` (a path: an MVTec-layout root; seeded subset
    when ``eval_cfg.max_images``); defect images without a mask are kept (``mask_path`` None: the
    category gets image metrics only)."""
    samples = as_test_set(data).samples(category, skip_bad)
    return _select(samples, eval_cfg.max_images, seed)


def evaluate(
    model: DZAD,
    root: str | Path | TestSet,
    categories: Sequence[str],
    out_dir: str | Path,
    eval_cfg: EvalConfig,
    controls: Sequence[Control] | None = None,
    *,
    save_maps: bool = False,
    skip_bad: bool = False,
    progress: Callable[[int], None] | None = None,
    pictures: bool = False,
    save_masks: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on the test split of ``categories`` (empty = all) of ``root``: an
    MVTec-layout root (a path) or any :class:`~dzad.data.test_sets.TestSet` (e.g. the one category
    of a :class:`~dzad.data.test_sets.FolderSet`, plain folder layout).

    ``controls``: fitted controls (:func:`build_controls`) or None (no controls section).
    ``progress(n)`` is called after each batch of ``n`` images. ``pictures``: per-image heat maps
    and panels and ``report.html`` (:mod:`dzad.evaluation_pictures`); ``save_masks`` adds the
    predicted masks. Returns the ``metrics.json`` data.
    """
    if save_masks and not pictures:
        raise ValueError("save_masks needs pictures=True (the masks are drawn with them)")
    out_dir = Path(out_dir)
    data = as_test_set(root)
    rule = decision_threshold(model)
    # pictures are named by their path under the data (a FolderSet's: under its folders' parent)
    pics = EvalPictures.calibrated(model, data.root, rule, save_masks) if pictures else None
    cats = data.categories(categories)
    data_cfg = replace(model.cfg.data, skip_bad=False)  # unreadable files: _drop_unreadable
    controls = list(controls or [])
    per_cat: dict[str, dict[str, float]] = {}
    variants: dict[str, dict[str, dict[str, float]]] = {name: {} for name, _ in VARIANT_SCORES}
    ctrl: dict[str, dict[str, dict[str, float]]] = {c.name: {} for c in controls}
    skipped: dict[str, Any] = {"categories": {}, "metrics": {}, "files": []}
    counts: dict[str, dict[str, int]] = {}
    decisions: dict[str, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    f_parts: list[np.ndarray] = []
    for cat in cats:
        samples = category_samples(data, cat, eval_cfg, model.cfg.seed, skip_bad)
        ds = ImageDataset(samples, model.image_size, data_cfg)
        if skip_bad:
            skipped["files"] += _drop_unreadable(ds)
        if len(ds) == 0:
            skipped["categories"][cat] = "no test images"
            continue
        n_defect = sum(s.label for s in ds.samples)
        maps_path = out_dir / "maps" / f"{cat}.npy"
        kept = atomic_path(maps_path) if save_maps else None
        with kept or (pics.scratch(cat) if pics else contextlib.nullcontext()) as tmp:
            maps_out = None
            if tmp is not None:
                shape = (len(ds), model.image_size, model.image_size)
                maps_out = np.lib.format.open_memmap(tmp, "w+", np.float32, shape)
            run, defect_pixels = run_category(model, ds, eval_cfg, controls, maps_out, progress)
            finish_scores(model, run.rows)
            for r in run.rows:
                r["normalised_score"] = rule.normalise(r[rule.key])
            if pics is not None:
                pics.add(ds.samples, run.rows, maps_out)
            if maps_out is not None:
                maps_out.flush()
                del maps_out
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
        decisions[cat] = run.decisions.result()
        no_mask = sum(s.label == 1 and s.mask_path is None for s in ds.samples)
        reasons = why_undefined(len(ds) - n_defect, n_defect, defect_pixels, no_mask)
        if reasons:
            skipped["metrics"][cat] = reasons
        if eval_cfg.figures:
            category_figures(out_dir / "figures", cat, labels, run, model)
        rows += run.rows
        f_parts += run.noise_matrices
    if not per_cat:
        raise DZADInputError(str(data), f"no test images in any of the categories {cats}")
    result = assemble(per_cat, variants, ctrl, controls, skipped, counts, decisions)
    result["regime"] = "zero-shot"  # per image, the paper's method (dzad.regime_evaluation: others)
    result["protocol"] = {
        "data": str(data),
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
    if pics is not None:
        pics.finish(out_dir, rows, result)
    write_outputs(out_dir, result, rows, f_parts, model, pics is not None)
    return result


def _fusion_reference(model: DZAD) -> str:
    problem = model.reference_problem()
    if problem is None:
        n = len(model.calibration.ref_map)  # type: ignore[arg-type]
        return f"SOURCE normals ({n} held-out images)"
    return f"test images of the category ({problem})"
