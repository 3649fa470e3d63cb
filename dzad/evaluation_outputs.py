"""What an evaluation writes: the ``metrics.json`` layout, its CSV files, the stored F, figures.

:func:`assemble` builds the ``metrics.json`` data (the layout ``dzad.reports`` reads; NaN becomes
null), :func:`metrics_frame` the rows of ``metrics.csv``, :func:`category_figures` one category's
ROC, precision-recall and heat-map figures, and :func:`write_outputs` writes ``scores.csv``,
``metrics.csv``, ``noise_features.npz`` and ``metrics.json``, each atomically.
:func:`dzad.evaluation.evaluate` calls them.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dzad.category_run import CategoryRun
from dzad.decision_quality import DECISIONS_LABEL
from dzad.decisions import map_threshold
from dzad.io_utils import atomic_write_bytes, atomic_write_text
from dzad.metrics import IMAGE_METRICS, PIXEL_METRICS, macro_mean
from dzad.model import DZAD
from dzad.reports import plot_pr_curves, plot_roc_curves
from dzad.run_panels import FILES as PICTURE_FILES

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
    "normalised_score",
)
METRICS = (*IMAGE_METRICS, *PIXEL_METRICS)
# everything one evaluation (any regime) may write into its folder, in the order a staged run
# swaps them in (``dzad evaluate``: dzad.io_utils.replace_outputs); metrics.json, which the
# reports read, last
OUTPUTS = (
    "figures",
    "maps",
    "heatmaps",
    "panels",
    "thumbs",
    "masks",
    "noise_features.npz",
    "scores.csv",
    "metrics.csv",
    "report.html",
    "metrics.json",
)


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    return x


def mean_without_skipped(per_cat: dict[str, dict[str, float]]) -> dict[str, float]:
    """:func:`dzad.metrics.macro_mean` without its ``skipped`` entry (explained elsewhere)."""
    mean = macro_mean(per_cat)
    mean.pop("skipped", None)
    return mean


def assemble(
    per_cat, variants, ctrl, controls, skipped, counts, decisions=None, **blocks: Any
) -> dict:
    """``metrics.json``'s layout; ``decisions``: per category, the quality of the written
    decisions (:mod:`dzad.decision_quality`); ``blocks``: more top-level entries. NaN is written
    as null."""
    labels = {c.name: c.label for c in controls}
    if decisions is not None:
        mean = mean_without_skipped(decisions)
        blocks["decisions"] = {"label": DECISIONS_LABEL, "categories": decisions, "mean": mean}
    return _nan_to_none(
        {
            "categories": per_cat,
            "mean": mean_without_skipped(per_cat),
            "variants": {
                name: {"categories": v, "mean": mean_without_skipped(v)}
                for name, v in variants.items()
                if v
            },
            "controls": {
                name: {"label": labels[name], "categories": v, "mean": mean_without_skipped(v)}
                for name, v in ctrl.items()
                if v
            },
            "skipped": skipped,
            "counts": counts,
            **blocks,
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


def category_figures(
    folder: Path, cat: str, labels: np.ndarray, run: CategoryRun, model: DZAD
) -> None:
    curves = {
        "DZAD map": (labels, np.array([r["map_score"] for r in run.rows])),
        "detection score": (labels, np.array([r["detection_score"] for r in run.rows])),
        "fusion": (labels, np.array([r["fused_score"] for r in run.rows])),
    }
    plot_roc_curves(curves, folder / f"{cat}_roc.png", title=f"{cat}: image-level ROC")
    plot_pr_curves(curves, folder / f"{cat}_pr.png", title=f"{cat}: image-level precision-recall")
    gate = model.cfg.anomaly_map.gating
    level, _ = map_threshold(model)
    run.extremes.plot(
        folder / f"{cat}_heatmaps.png",
        f"{cat}: highest / lowest map scores (gating {gate}; cyan = ground truth)",
        level,
    )


def write_outputs(
    out_dir: Path,
    result: dict,
    rows: list[dict],
    f_parts: list[np.ndarray],
    model: DZAD,
    pictures: bool = False,
) -> None:
    """``pictures``: ``scores.csv`` also lists each image's picture files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [*SCORE_COLUMNS, *(PICTURE_FILES if pictures else ())]
    scores = pd.DataFrame.from_records(rows, columns=columns)
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
