"""The batch zero-shot and few-shot regimes of a study on one target (docs/method.md §11.1).

Per seed's checkpoint, :func:`dzad.regime_evaluation.evaluate_regime` (the function ``dzad evaluate
--batch-zero-shot`` / ``--few-shot K`` runs) on the target's dataset root, so the regimes see the
images at ``regime.image_size`` rather than at the per-image cache's size; ``K`` is
``regime.few_shot_k``. Folders: ``<out>/<regime>/seed_<s>/`` (the CLI's outputs) and
``<out>/<regime>/summary.json`` (mean ± std over seeds, :func:`dzad.study.summaries.summarise`).
A target without ``train/good`` images (a test-only set) gets batch zero-shot alone;
``regime.max_images`` > 0 scores a seeded subset of each category's test images (the same for
every seed: drawn with ``regime.seed``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from dzad.config import DatasetRef, DZADConfig
from dzad.errors import DZADInputError
from dzad.io_utils import atomic_dir
from dzad.study.layout import checkpoints, seed_dir, target_ref, with_seed
from dzad.study.seed_evaluation import SUMMARY, compact_metrics, load_model, seed_results
from dzad.study.summaries import summarise, write_json

log = logging.getLogger(__name__)

# folder name -> how many references per draw (0 = batch zero-shot; None = regime.few_shot_k)
REGIME_DIRS: dict[str, int | None] = {"batch_zero_shot": 0, "few_shot": None}


def _few_shot(cfg: DZADConfig, name: str) -> int:
    k = REGIME_DIRS[name]
    return cfg.regime.few_shot_k if k is None else k


def runnable_regimes(ref: DatasetRef) -> list[str]:
    """The regime folders ``ref`` allows: few-shot only when every category has ``train/good``
    images to draw references from (a test-only set gets batch zero-shot alone, with a warning)."""
    from dzad.data.dataset import collect_samples, list_categories

    cats = list(ref.categories) or list_categories(ref.root)
    missing = [c for c in cats if not collect_samples(ref.root, (c,), ("train",))]
    if not missing:
        return list(REGIME_DIRS)
    log.warning("%s: no train/good images in %s: few-shot not evaluated", ref.root, missing)
    return [name for name, k in REGIME_DIRS.items() if k == 0]


def evaluate_regimes(
    cfg: DZADConfig, models: str | Path, target: str, out_dir: str | Path
) -> dict[str, dict]:
    """Both regimes for every seed's checkpoint on ``target``; ``{regime dir: summary}``.

    The whole folder is built under a temporary name and swapped in (a failed run leaves the
    previous one)."""
    from dzad.evaluation import control_backbone
    from dzad.regime_evaluation import evaluate_regime

    ref = target_ref(cfg, target)
    ckpts = checkpoints(models, cfg.seeds)
    eval_cfg = replace(cfg.evaluate, max_images=cfg.regime.max_images)
    names = runnable_regimes(ref)
    summaries: dict[str, dict] = {}
    memo: dict[tuple, Any] = {}  # backbone grids: computed with the first seed, reused after
    with atomic_dir(out_dir) as tmp:
        for s, ckpt in ckpts.items():
            model = load_model(ckpt, with_seed(cfg, s))
            backbone = control_backbone(model)
            for name in names:
                evaluate_regime(
                    model, backbone, ref.root, ref.categories, seed_dir(tmp / name, s),
                    cfg.regime, eval_cfg,
                    few_shot=_few_shot(cfg, name), skip_bad=cfg.data.skip_bad, memo=memo,
                )  # fmt: skip
        for name in names:
            summary = summarise(target, seed_results(tmp / name))
            first = json.loads((seed_dir(tmp / name, min(ckpts)) / "metrics.json").read_text())
            summary["regime"], summary["protocol"] = first["regime"], first["protocol"]
            write_json(tmp / name / SUMMARY, summary)
            summaries[name] = summary
    return summaries


def regime_results(regime_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``{regime dir: [metrics.json per seed]}`` of a target's regimes folder."""
    if not Path(regime_dir).is_dir():
        raise DZADInputError(regime_dir, "no regime evaluations: run `dzad stage regimes` first")
    found = [name for name in REGIME_DIRS if (Path(regime_dir) / name).is_dir()]
    return {name: list(seed_results(Path(regime_dir) / name).values()) for name in found}


def export_regimes(regime_dir: str | Path, metrics_dir: str | Path) -> Path:
    """For DVC: ``metrics_dir/<regime>_<method>.json`` (:func:`compact_metrics` of each regime's
    summary: the regime and its controls, one narrow row each)."""
    with atomic_dir(metrics_dir) as tmp:
        for name in regime_results(regime_dir):
            summary = json.loads((Path(regime_dir) / name / SUMMARY).read_text())
            for method, values in compact_metrics(summary).items():
                write_json(tmp / f"{name}_{method}.json", values)
    return Path(metrics_dir)
