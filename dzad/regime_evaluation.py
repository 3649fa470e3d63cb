"""``dzad evaluate --batch-zero-shot`` / ``--few-shot K`` (method.md §11.1): regimes on a test root.

Per category, the test images are loaded at ``regime.image_size`` (masks too) and scored:

- batch zero-shot: in seeded groups of ``regime.group_size`` images (the category at once when 0),
  each group one unlabelled batch (:func:`dzad.regimes.score_batch`); the control ``mutual`` is
  the same MuSc recipe on the backbone alone (the regime's own backbone grid, so the only
  difference is the DZAD signal);
- few-shot: ``K`` images drawn from the category's ``train/good`` with seed ``regime.seed + d``
  for each of ``regime.few_shot_draws`` draws (never test images), all test images scored against
  them (:func:`dzad.regimes.score_few_shot`); the control ``fewshot_patchcore`` is PatchCore
  (nearest reference patch, local aggregation 3) with the same backbone, levels and draws.
  Metrics are the mean over draws, their sample std under ``std``.

``metrics.json`` has the layout of :func:`dzad.evaluation_outputs.assemble` (``categories``,
``mean``, ``variants`` = each signal alone, ``controls``) plus ``regime`` (the label every table
must carry), ``decisions`` (how good the label-free decisions and predicted regions were against
the labels, :mod:`dzad.decision_quality`) and the regime's settings under ``protocol``;
``scores.csv`` has one row per image (and draw). With ``pictures``, the regime's fused maps get
the per-image pictures and ``report.html`` of a per-image evaluation (few-shot: of draw 0 only);
``save_masks`` adds the predicted masks (``masks/``). What is written, and how, is
:mod:`dzad.regime_outputs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dzad.backbones import Backbone
from dzad.category_run import why_undefined
from dzad.config import RegimeConfig, to_dict
from dzad.data.dataset import ImageDataset, Sample, collect_samples
from dzad.data.test_sets import TestSet, as_test_set
from dzad.decision_quality import DecisionCounts, flagged_rows
from dzad.errors import DZADInputError
from dzad.evaluation import category_samples
from dzad.evaluation_outputs import assemble
from dzad.metrics import PIXEL_METRICS, MetricAccumulator
from dzad.model import DZAD
from dzad.mutual_scoring import rescore_images, upsample
from dzad.regime_outputs import add_pictures, regime_pictures, score_rows, write_regime_outputs
from dzad.regimes import REGIME_LABELS, Scored, map_level, score_batch, score_few_shot

CONTROL_LABELS = {
    "mutual": "control: mutual scoring, MuSc recipe (backbone only, batch zero-shot)",
    "fewshot_patchcore": "control: few-shot PatchCore (same backbone and draws)",
}


@dataclass(frozen=True)
class _Named:
    name: str
    label: str


def draw_references(train: Sequence[Sample], k: int, seed: int) -> list[Sample]:
    """``k`` of the ``train/good`` samples, drawn with ``seed`` (listing order kept)."""
    if k < 1 or k > len(train):
        where = f"{train[0].path.parent}: " if train else ""
        raise ValueError(f"{where}few-shot k = {k} needs 1 <= k <= {len(train)} train/good images")
    keep = np.random.default_rng(seed).choice(len(train), k, replace=False)
    return [train[i] for i in sorted(keep)]


def seeded_groups(n: int, group_size: int, seed: int) -> list[np.ndarray]:
    """Indices ``0..n-1`` in a seeded order, split into near-equal groups of <= ``group_size``."""
    order = np.random.default_rng(seed).permutation(n)
    if group_size <= 0 or n <= group_size:
        return [np.sort(order)]
    parts = math.ceil(n / group_size)
    return [np.sort(g) for g in np.array_split(order, parts)]


def _load(ds: ImageDataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(len(ds))]
    images = torch.stack([it["image"] for it in items])  # (n,3,S,S)
    masks = torch.stack([it["mask"] for it in items])  # (n,1,S,S)
    return images, masks, torch.tensor([it["label"] for it in items])


def _backbone_only(scored: Scored, rescore_k: int, glob: torch.Tensor | None, size: int):
    """The control's (scores, maps) from the regime's own backbone grid (no DZAD signal)."""
    grid = scored.parts["backbone"]
    scores = grid.flatten(1).amax(1)
    if glob is not None:
        scores = rescore_images(scores, glob, rescore_k)
    return scores, upsample(grid, size)


def _accumulate(accs: dict[str, MetricAccumulator], name: str, labels, scores, masks, maps, pixel):
    accs.setdefault(name, MetricAccumulator()).add(
        labels, scores, masks if pixel else None, maps if pixel else None
    )


def _results(accs: dict[str, MetricAccumulator], pixel: bool) -> dict[str, dict[str, float]]:
    out = {}
    for name, acc in accs.items():
        m = acc.result()
        if not pixel:
            m.update(dict.fromkeys(PIXEL_METRICS, math.nan))
        out[name] = m
    return out


def _part_grids_to_maps(scored: Scored, size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {k: (g.flatten(1).amax(1), upsample(g, size)) for k, g in scored.parts.items()}


def _batch_category(
    model, backbone, rc, images, masks, labels, pixel, rows, samples, memo, pics, shown
):  # fmt: skip
    accs: dict[str, MetricAccumulator] = {}
    counts = DecisionCounts()
    paths = [str(s.path) for s in samples]
    for group in seeded_groups(len(images), rc.group_size, rc.seed):
        x, m, y = images[group], masks[group], labels[group]
        key = ("batch", tuple(paths[j] for j in group))
        scored = score_batch(backbone, x, rc, model, memo.get(key))
        memo[key] = (scored.parts["backbone"], scored.descriptors)
        _accumulate(accs, "regime", y, scored.scores, m, scored.maps, pixel)
        c_s, c_m = _backbone_only(scored, rc.rescore_k, scored.descriptors, x.shape[-1])
        _accumulate(accs, "control:mutual", y, c_s, m, c_m, pixel)
        for k, (s, mp) in _part_grids_to_maps(scored, x.shape[-1]).items():
            _accumulate(accs, f"part:{k}", y, s, m, mp, pixel)
        batch = [samples[j] for j in group]
        group_rows = score_rows(batch, y, "", scored.scores)
        rows += group_rows
        level = map_level(scored.maps, rc)
        counts.add(y, flagged_rows(group_rows), m if pixel else None, scored.maps, level)
        add_pictures(pics, batch, group_rows, scored, level, shown)
    return [{**_results(accs, pixel), "decisions": counts.result()}]


def _few_shot_category(
    model, backbone, rc, images, masks, labels, pixel, rows, samples, train, k, memo, pics, shown
):  # fmt: skip
    draws, paths = [], [str(s.path) for s in samples]
    control_rc = replace(rc, few_shot_threshold="batch")
    for d in range(rc.few_shot_draws):
        refs = draw_references(train, k, rc.seed + d)
        ref_ds = ImageDataset(refs, rc.image_size, model.cfg.data)
        ref_images = torch.stack([ref_ds[i]["image"] for i in range(len(ref_ds))])
        accs: dict[str, MetricAccumulator] = {}
        key = ("few", tuple(paths), tuple(str(r.path) for r in refs))
        grid, ref_grid = memo.get(key, (None, None))
        scored = score_few_shot(backbone, images, ref_images, rc, model, None, grid, ref_grid)
        memo[key] = (scored.parts["backbone"], scored.reference_grid)
        _accumulate(accs, "regime", labels, scored.scores, masks, scored.maps, pixel)
        key = ("patchcore", *key[1:])
        # the control's decisions are not written: no leave-one-out scores of its references
        ctrl = score_few_shot(backbone, images, ref_images, control_rc, None, (3,), memo.get(key))
        memo[key] = ctrl.parts["backbone"]
        _accumulate(accs, "control:fewshot_patchcore", labels, ctrl.scores, masks, ctrl.maps, pixel)
        for name, (s, mp) in _part_grids_to_maps(scored, images.shape[-1]).items():
            _accumulate(accs, f"part:{name}", labels, s, masks, mp, pixel)
        draw_rows = score_rows(samples, labels, d, scored.scores, scored.reference_scores)
        rows += draw_rows
        level, counts = map_level(scored.maps, rc, scored.reference_maps), DecisionCounts()
        counts.add(labels, flagged_rows(draw_rows), masks if pixel else None, scored.maps, level)
        if d == 0:  # the pictures show the first draw's maps
            add_pictures(pics, samples, draw_rows, scored, level, shown)
        draws.append({**_results(accs, pixel), "decisions": counts.result()})
    return draws


def _mean_std(draws: list[dict[str, dict[str, float]]], name: str) -> tuple[dict, dict]:
    keys = draws[0][name].keys()
    vals = {m: np.array([d[name][m] for d in draws], dtype=float) for m in keys}
    mean = {m: float(v.mean()) for m, v in vals.items()}
    std = {m: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for m, v in vals.items()}
    return mean, std


def evaluate_regime(
    model: DZAD,
    backbone: Backbone,
    root: str | Path | TestSet,
    categories: Sequence[str],
    out_dir: str | Path,
    rc: RegimeConfig,
    eval_cfg,
    *,
    few_shot: int = 0,
    skip_bad: bool = False,
    progress: Callable[[int], None] | None = None,
    memo: dict[tuple, Any] | None = None,
    pictures: bool = False,
    save_masks: bool = False,
) -> dict[str, Any]:
    """Batch zero-shot (``few_shot == 0``) or few-shot with ``few_shot`` references per draw, on
    the test split of ``categories`` (empty = all) of ``root``, an MVTec-layout root (a path or a
    :class:`~dzad.data.test_sets.MVTecRoot`: few-shot draws from its ``train/good``).

    ``pictures``: per-image pictures of the regime's maps and ``report.html`` (few-shot: draw 0);
    ``save_masks`` adds the predicted masks, thresholded per scored batch without labels.
    ``memo``: backbone grids by (regime, image paths[, reference paths]), filled and reused, so a
    caller scoring several models on the same images (a study's seeds) computes them once; the
    backbone, ``rc`` and the data settings must be the same for every call sharing it."""
    memo = {} if memo is None else memo
    data, out_dir = as_test_set(root), Path(out_dir)
    mode = "few-shot" if few_shot else "batch-zero-shot"
    cats = data.categories(categories)
    data_cfg = replace(model.cfg.data, skip_bad=False)
    per_cat, std_cat, variants, ctrl, decisions = {}, {}, {}, {}, {}
    stores = {"regime": per_cat, "decisions": decisions}  # draws' entries kept per category
    skipped: dict[str, Any] = {"categories": {}, "metrics": {}, "files": []}
    counts, rows = {}, []
    if save_masks and not pictures:
        raise ValueError("save_masks needs pictures=True (the masks are drawn with them)")
    mask_threshold = model.cfg.data.mask_threshold
    pics = regime_pictures(data.root, rc, mode, mask_threshold, save_masks) if pictures else None
    shown: list[dict[str, Any]] = []  # the rows that have pictures, in the order added
    for cat in cats:
        # the subset (eval_cfg.max_images) is the regime's: the same images for every checkpoint
        samples = category_samples(data, cat, eval_cfg, rc.seed, skip_bad)
        if not samples:
            skipped["categories"][cat] = "no test images"
            continue
        ds = ImageDataset(samples, rc.image_size, data_cfg)
        images, masks, labels = _load(ds)
        pixel = all(s.mask_path is not None for s in samples if s.label == 1)
        if few_shot:
            train = collect_samples(data.root, (cat,), ("train",), skip_bad=skip_bad)
            if not train:
                raise DZADInputError(
                    data.root / cat, "few-shot needs train/good images to draw from"
                )
            draws = _few_shot_category(
                model, backbone, rc, images, masks, labels, pixel, rows, samples, train, few_shot,
                memo, pics, shown,
            )  # fmt: skip
        else:
            draws = _batch_category(
                model, backbone, rc, images, masks, labels, pixel, rows, samples, memo, pics, shown
            )
        for name in draws[0]:
            mean, std = _mean_std(draws, name)
            if name in stores:
                stores[name][cat], std_cat.setdefault(name, {})[cat] = mean, std
            elif name.startswith("control:"):
                ctrl.setdefault(name[8:], {})[cat] = mean
                std_cat.setdefault(name[8:], {})[cat] = std
            else:
                variants.setdefault(name[5:], {})[cat] = mean
        n_defect = int(labels.sum())
        counts[cat] = {"images": len(samples), "good": len(samples) - n_defect, "defect": n_defect}
        no_mask = sum(s.label == 1 and s.mask_path is None for s in samples)
        reasons = why_undefined(len(samples) - n_defect, n_defect, int(masks.sum()), no_mask)
        if reasons:
            skipped["metrics"][cat] = reasons
        if progress is not None:
            progress(len(samples))
    if not per_cat:
        raise DZADInputError(data.root, f"no test images in any of the categories {cats}")
    named = [_Named(n, CONTROL_LABELS[n]) for n in ctrl]
    spread = {"std": std_cat} if few_shot else {}  # NaN (undefined metrics) written as null
    result = assemble(per_cat, variants, ctrl, named, skipped, counts, decisions, **spread)
    result["regime"] = REGIME_LABELS[mode]
    result["protocol"] = {
        "data": str(data),
        "regime": REGIME_LABELS[mode],
        "few_shot_k": few_shot,
        "model_image_size": model.image_size,
        "settings": to_dict(rc),
        "max_images": eval_cfg.max_images,
        "backbone": backbone.name,
    }
    write_regime_outputs(out_dir, result, rows, pics, shown)
    return result
