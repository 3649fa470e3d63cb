"""The ablation stage of a study (``ablate``): Table 4 (weight functions), Figure 4 (timesteps) and
Table 3 (architecture), the ablation folder, and the metrics and plot points DVC reads.

- Table 4: every weight function of ``ablation.weightings`` rescores the noise-feature matrices F
  ``(B,N,M)`` the evaluation stored (``noise_features.npz``) with the same SOURCE-only stage
  statistics; no model runs. The number is the image AUROC of the detection score s (eq. 13), the
  only score a weight function changes without rerunning the gated map.
- Figure 4 and Table 3 rerun models: :mod:`dzad.study.ablation_reruns`.

Results are kept per target and per seed as ``{"categories": {cat: {metric: v}}, "mean": {...}}``
(the mapping :mod:`dzad.reports` reads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dzad.config import DZADConfig
from dzad.evaluation_outputs import mean_without_skipped
from dzad.io_utils import atomic_dir, atomic_write_text
from dzad.metrics import image_metrics
from dzad.study.ablation_reruns import Result, architecture_results, timestep_results
from dzad.study.layout import checkpoints
from dzad.study.seed_evaluation import seed_file
from dzad.study.summaries import KEY_METRICS, mean_std, write_json

ABLATION_JSON = "ablation.json"
NPZ = "noise_features.npz"


def ablate(cfg: DZADConfig, ckpt: Path, eval_dirs: dict[str, Path], out_dir: Path) -> pd.DataFrame:
    """Table 4 (rescored from the stored noise features: no model run), Figure 4 (``t_start``
    reruns) and, with ``ablation.architecture``, Table 3 (:mod:`dzad.study.ablation_reruns`).

    ``ckpt``: the models folder (``seed_<s>/``) or one checkpoint; ``eval_dirs``: ``{target:
    evaluation folder of evaluate_seeds}``. Writes ``out_dir/ablation.json`` (per-seed results)
    and ``ablation.csv``; returns that long table (one row per ablation, setting, target, seed).
    """
    ckpts = checkpoints(ckpt, cfg.seeds)
    cfg = replace(cfg, seeds=tuple(ckpts))  # one checkpoint: its seed only, as evaluate_seeds
    a = cfg.ablation
    with atomic_dir(out_dir) as tmp:
        record = {
            "weighting": weighting_results(cfg, eval_dirs) if a.weightings else {},
            "timesteps": timestep_results(cfg, ckpts, eval_dirs, tmp / "timesteps")
            if a.t_starts
            else {},
            "architecture": architecture_results(cfg, ckpts, eval_dirs, tmp / "architecture")
            if a.architecture
            else {},
        }
        write_json(tmp / ABLATION_JSON, record)
        frame = long_frame(record)
        atomic_write_text(tmp / "ablation.csv", frame.to_csv(index=False, float_format="%.6g"))
    return frame


def export_ablation(
    ablation_dir: str | Path, metrics_file: str | Path, plots_dir: str | Path
) -> list[Path]:
    """``metrics_file`` (means over seeds) and ``plots_dir/ablation_<kind>.csv`` for DVC."""
    frame = pd.read_csv(Path(ablation_dir) / "ablation.csv", dtype={"setting": str})
    paths = [write_json(metrics_file, dvc_metrics(frame))]
    for kind, df in plot_frames(frame).items():
        path = Path(plots_dir) / f"ablation_{kind}.csv"
        paths.append(atomic_write_text(path, df.to_csv(index=False, float_format="%.6g")))
    return paths


def image_result(labels: np.ndarray, categories: np.ndarray, scores: np.ndarray) -> Result:
    """Per-category image metrics of ``scores`` ``(n,)`` and their macro mean."""
    per_cat = {
        str(c): image_metrics(labels[categories == c], scores[categories == c])
        for c in dict.fromkeys(categories.tolist())
    }
    return {"categories": per_cat, "mean": mean_without_skipped(per_cat)}


# ---------------------------------------------------------------------------------------- Table 4
def rescore_file(
    npz: Mapping[str, np.ndarray], names: Sequence[str], k: float, learned: bool = False
) -> dict[str, np.ndarray]:
    """Detection scores ``(n,)`` of a stored ``noise_features.npz`` under every weight function.

    ``learned``: the checkpoint was calibrated with the learned weighting, so its stored weights
    and bias are that function; otherwise "learned" cannot be rescored (it needs calibration).
    """
    from dzad.weighting import rescore

    noise_matrix = torch.from_numpy(np.asarray(npz["F"], np.float32))
    standardise = bool(npz["standardise"])
    mean = torch.from_numpy(npz["stage_mean"]) if standardise else None
    std = torch.from_numpy(npz["stage_std"]) if standardise else None
    fitted = None
    if learned:
        fitted = (torch.from_numpy(npz["weights"]), float(npz["bias"]))
    elif "learned" in names:
        raise ValueError(
            "ablation.weightings lists 'learned', but the checkpoints were calibrated with another "
            "weighting: train with weighting.name: learned to rescore it"
        )
    alphas = torch.from_numpy(npz["alphas_cumprod"])
    scores = rescore(noise_matrix, tuple(names), alphas, k=k, mean=mean, std=std, learned=fitted)
    return {name: s.double().numpy() for name, s in scores.items()}


def weighting_results(
    cfg: DZADConfig, eval_dirs: Mapping[str, Path]
) -> dict[str, dict[str, list[Result]]]:
    """Table 4: ``{weight function: {target: [result per seed of cfg.seeds]}}`` rescored from
    stored F; other seeds' folders in ``eval_dirs`` are ignored, a missing one is an error."""
    out: dict[str, dict[str, list[Result]]] = {n: {} for n in cfg.ablation.weightings}
    learned = cfg.weighting.name == "learned"
    for target, eval_dir in eval_dirs.items():
        for seed in cfg.seeds:
            with np.load(seed_file(eval_dir, seed, NPZ)) as npz:
                data = dict(npz)
            scores = rescore_file(data, cfg.ablation.weightings, cfg.weighting.k, learned)
            for name, s in scores.items():
                result = image_result(data["label"], data["category"], s)
                out[name].setdefault(target, []).append(result)
    return out


# ------------------------------------------------------------------------------------- summaries
def long_frame(record: Mapping[str, Any]) -> pd.DataFrame:
    """One row per (ablation, setting, target, seed) with the macro-mean key metrics."""
    rows = []

    def add(kind: str, setting: str, target: str, results: Sequence[Result]) -> None:
        for i, r in enumerate(results):
            values = {m: r["mean"].get(m) for m in KEY_METRICS}
            rows.append(
                {"ablation": kind, "setting": setting, "target": target, "run": i, **values}
            )

    for kind in ("weighting", "timesteps"):
        for setting, by_target in record.get(kind, {}).items():
            for target, results in by_target.items():
                add(kind, setting, target, results)
    for target, table in record.get("architecture", {}).items():
        for row in table:
            setting = "+".join(k for k, v in row["flags"].items() if v)
            add("architecture", setting, target, row["results"])
    columns = ["ablation", "setting", "target", "run", *KEY_METRICS]
    return pd.DataFrame(rows, columns=columns)


def dvc_metrics(frame: pd.DataFrame) -> dict[str, Any]:
    """``{ablation: {setting: {target: {metric: mean over seeds}}}}`` (NaN-free JSON for DVC)."""
    out: dict[str, Any] = {}
    for (kind, setting, target), g in frame.groupby(["ablation", "setting", "target"], sort=False):
        values = {m: mean_std(g[m].tolist())["mean"] for m in KEY_METRICS}
        out.setdefault(kind, {}).setdefault(setting, {})[target] = {
            m: v for m, v in values.items() if v is not None
        }
    return out


def plot_frames(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """DVC plots: Table-4 bars and Figure-4 points, means over targets and seeds (always both
    files, so that the stage's declared outputs exist)."""
    out = {}
    for kind, key, metrics in (
        ("weighting", "weighting", ("image_auroc",)),
        ("timesteps", "t_start", ("image_auroc", "pixel_auroc")),
    ):
        sub = frame[frame["ablation"] == kind]  # empty when that ablation is off: header only
        g = sub.groupby("setting", sort=False)[list(metrics)].mean().reset_index()
        out[kind] = g.rename(columns={"setting": key})
    return out


def timesteps_table(record: Mapping[str, Mapping[str, Sequence[Result]]]):
    """Figure 4 as a table: rows t_start, columns ``<target>: image_auroc|pixel_auroc``."""
    from dzad.reports import Table

    means: dict[str, dict[int, float]] = {}
    stds: dict[str, dict[int, float]] = {}
    for t, by_target in record.items():
        for target, results in by_target.items():
            for m in ("image_auroc", "pixel_auroc"):
                s = mean_std([r["mean"].get(m) for r in results])
                column = f"{target}: {m}"
                means.setdefault(column, {})[int(t)] = np.nan if s["mean"] is None else s["mean"]
                stds.setdefault(column, {})[int(t)] = np.nan if s["std"] is None else s["std"]
    mean, std = pd.DataFrame(means, dtype=float), pd.DataFrame(stds, dtype=float)
    mean.index.name = std.index.name = "t_start"
    return Table(mean, None if std.isna().all().all() else std)


def plot_timesteps(table, path: Path) -> Path:
    """Figure 4: AUROC against the reconstruction start timestep, one line per column."""
    from matplotlib.figure import Figure

    from dzad.io_utils import atomic_path

    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    x = table.mean.index.to_numpy()
    for column in table.mean.columns:
        err = None if table.std is None else table.std[column].fillna(0).to_numpy()
        ax.errorbar(x, table.mean[column].to_numpy(), yerr=err, marker="o", capsize=3, label=column)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="reconstruction start t_start", ylabel="AUROC", title="Figure 4: timesteps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path
