"""Per-seed evaluations of a study's checkpoints on one target (``evaluate``), their summary over
seeds and the image-level ROC / PR points DVC plots."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from dzad.config import DZADConfig
from dzad.errors import DZADInputError
from dzad.io_utils import atomic_dir, atomic_write_text
from dzad.study.layout import (
    SEED_DIR,
    checkpoints,
    seed_dir,
    source_cache_refs,
    target_cache,
    with_seed,
)
from dzad.study.summaries import summarise, write_json

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
INFERENCE_SECTIONS = ("reconstruction", "anomaly_map", "evaluate")


def load_model(ckpt: str | Path, cfg: DZADConfig, device: str | None = None):
    """The checkpoint's :class:`~dzad.model.DZAD` with the study's inference-time settings.

    Training-time sections (model, train, noise bank, weighting, detection) are the checkpoint's:
    they are baked into its weights and calibration. ``reconstruction``, ``anomaly_map``,
    ``evaluate`` and ``noise.max_batch`` come from ``cfg``, so changing them needs no retraining.
    """
    from dzad.model import DZAD
    from dzad.runtime import choose_device

    m = cfg.anomaly_map
    model = DZAD.from_checkpoint(
        ckpt,
        backbone_override=m.backbone,
        random_backbone=m.random_backbone,
        map_location=device or choose_device(cfg.train.device),
    )
    trained = model.cfg
    for name in ("model", "weighting", "detection"):
        if getattr(trained, name) != getattr(cfg, name):
            log.warning(
                "%s: its %s settings differ from the study's; using the checkpoint's", ckpt, name
            )
    return model.with_settings(
        replace(
            trained,
            **{name: getattr(cfg, name) for name in INFERENCE_SECTIONS},
            noise=replace(trained.noise, max_batch=cfg.noise.max_batch),
            data=replace(trained.data, skip_bad=cfg.data.skip_bad),
        )
    )


def source_control_batches(cfg: DZADConfig, image_size: int) -> Callable[[], Any]:
    """``source()`` for :func:`dzad.evaluation.build_controls`: SOURCE normals from the caches."""
    from dzad.evaluation import source_batches

    refs = source_cache_refs(cfg)
    return lambda: source_batches(refs, image_size, cfg.data, cfg.evaluate.batch_size)


def evaluate_model(model, cfg: DZADConfig, target: str, out_dir: Path, *, controls: bool) -> dict:
    """:func:`dzad.evaluation.evaluate` of a built model on one target's cache (atomic folder)."""
    from dzad.evaluation import build_controls, evaluate

    ctrl = None
    if controls:
        ctrl = build_controls(
            model, model.cfg.evaluate, source_control_batches(cfg, model.image_size)
        )
    with atomic_dir(out_dir) as tmp:
        result = evaluate(
            model, target_cache(cfg, target), (), tmp, model.cfg.evaluate, ctrl,
            skip_bad=cfg.data.skip_bad,
        )  # fmt: skip
    return result


def evaluate_target(
    ckpt: Path, cfg: DZADConfig, target: str, out_dir: Path, *, controls: bool | None = None
) -> dict:
    """Evaluate one checkpoint on one target (method.md §11); returns ``metrics.json``'s content.

    ``out_dir`` gets ``metrics.json``, ``metrics.csv``, ``scores.csv``, ``noise_features.npz`` and
    ``figures/``. ``controls`` None = ``cfg.evaluate.controls``.
    """
    model = load_model(ckpt, cfg)
    use = cfg.evaluate.controls if controls is None else controls
    return evaluate_model(model, cfg, target, Path(out_dir), controls=use)


def evaluate_seeds(cfg: DZADConfig, models: str | Path, target: str, out_dir: str | Path) -> dict:
    """:func:`evaluate_target` for every seed's checkpoint into ``out_dir/seed_<s>``.

    Controls are scored with every seed (same images, same metric code). Writes and returns
    ``out_dir/summary.json`` (:func:`dzad.study.summaries.summarise`).
    """
    ckpts = checkpoints(models, cfg.seeds)
    with atomic_dir(out_dir) as tmp:
        results = {
            s: evaluate_target(ck, with_seed(cfg, s), target, seed_dir(tmp, s))
            for s, ck in ckpts.items()
        }
        summary = summarise(target, results)
        write_json(tmp / SUMMARY, summary)
    return summary


def seed_file(eval_dir: str | Path, seed: int, name: str) -> Path:
    """``eval_dir/seed_<seed>/<name>``; :class:`DZADInputError` naming it when it is missing."""
    path = seed_dir(eval_dir, seed) / name
    if not path.is_file():
        raise DZADInputError(
            path, f"no evaluation output for seed {seed}: run `dzad stage evaluate` with this seed"
        )
    return path


def seed_result(eval_dir: str | Path, seed: int) -> dict:
    """``metrics.json`` of one seed's evaluation (``eval_dir/seed_<seed>/``)."""
    return json.loads(seed_file(eval_dir, seed, "metrics.json").read_text())


def _seed_dirs(eval_dir: str | Path) -> dict[int, Path]:
    """``{seed: eval_dir/seed_<s>}`` in seed order; nothing is read."""
    eval_dir = Path(eval_dir)
    found = {int(p.name.split("_")[1]): p for p in eval_dir.glob(SEED_DIR.format("*"))}
    if not found:
        raise DZADInputError(eval_dir, "no seed_<s>/ evaluation folders: run `dzad stage evaluate`")
    return dict(sorted(found.items()))


def seed_results(eval_dir: str | Path) -> dict[int, dict]:
    """``{seed: metrics.json}`` of an evaluation folder (``seed_<s>/`` subfolders)."""
    return {
        s: json.loads((p / "metrics.json").read_text()) for s, p in _seed_dirs(eval_dir).items()
    }


def first_seed_scores(eval_dir: str | Path) -> tuple[int, pd.DataFrame]:
    """The lowest seed of an evaluation folder and its ``scores.csv`` (per-image rows)."""
    first, folder = next(iter(_seed_dirs(eval_dir).items()))
    return first, pd.read_csv(folder / "scores.csv")


def curve_points(eval_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Image-level ROC ``(fpr, tpr)`` and PR ``(recall, precision)`` points of the first seed's
    image score, pooled over the target's categories (the per-category curves are PNG figures).

    A target with one class only (e.g. defect images only) has no image-level curve: both frames
    are empty (header only) and a warning says why; its pixel metrics are unaffected.
    """
    from sklearn.metrics import precision_recall_curve, roc_curve

    _, scores = first_seed_scores(eval_dir)
    y, s = scores["label"].to_numpy(), scores["image_score"].to_numpy()
    if y.size == 0 or y.min() == y.max():
        log.warning("%s: one class only: no image-level ROC/PR curve", eval_dir)
        return pd.DataFrame(columns=["fpr", "tpr"]), pd.DataFrame(columns=["recall", "precision"])
    fpr, tpr, _ = roc_curve(y, s)
    precision, recall, _ = precision_recall_curve(y, s)
    roc = pd.DataFrame({"fpr": fpr, "tpr": tpr})
    pr = pd.DataFrame({"recall": recall[::-1], "precision": precision[::-1]})
    return roc, pr


COMPACT_METRICS = ("image_auroc", "pixel_auroc", "aupro")


def compact_metrics(summary: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{method: {metric: mean over seeds}}`` for DZAD and each control (``control_<name>``):
    the three headline metrics only, so ``dvc metrics show`` stays one narrow row per method."""
    methods = {"dzad": summary["dzad"]}
    methods.update({f"control_{k}": v for k, v in summary["controls"].items()})
    return {
        name: {m: block[m]["mean"] for m in COMPACT_METRICS if m in block}
        for name, block in methods.items()
    }


def export_evaluation(
    target: str, eval_dir: str | Path, metrics_file: str | Path, plots_dir: str | Path
) -> list[Path]:
    """For DVC: ``metrics_file`` (the target's full summary, a plain output), the folder
    ``metrics_file`` without suffix holding one :func:`compact_metrics` file per method (the DVC
    metrics) and ``plots_dir/{roc,pr}_<target>.csv``."""
    summary = json.loads((Path(eval_dir) / SUMMARY).read_text())
    roc, pr = curve_points(eval_dir)
    plots_dir = Path(plots_dir)
    compact = Path(metrics_file).with_suffix("")
    with atomic_dir(compact) as tmp:
        for name, values in compact_metrics(summary).items():
            write_json(tmp / f"{name}.json", values)
    return [
        write_json(metrics_file, summary),
        atomic_write_text(
            plots_dir / f"roc_{target}.csv", roc.to_csv(index=False, float_format="%.6g")
        ),
        atomic_write_text(
            plots_dir / f"pr_{target}.csv", pr.to_csv(index=False, float_format="%.6g")
        ),
        compact,
    ]
