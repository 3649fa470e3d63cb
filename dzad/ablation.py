"""Ablations of the paper: Table 4 (weight functions), Figure 4 (timesteps), Table 3 (architecture).

- Table 4: every weight function of ``ablation.weightings`` rescores the noise-feature matrices F
  ``(B,N,M)`` the evaluation stored (``noise_features.npz``) with the same SOURCE-only stage
  statistics; no model runs. The number is the image AUROC of the detection score s (eq. 13), the
  only score a weight function changes without rerunning the gated map.
- Figure 4: the whole evaluation again for every reconstruction start ``t_start`` in
  ``ablation.t_starts`` (DDIM from that timestep, method-notes 5); image and pixel AUROC.
- Table 3 (``ablation.architecture``): the rows SD, +SGSD, +M_t, +F_b, +w_t of the paper. SD = no SG
  network (its own training run per seed); without M_t = one noise stage (N = 1: a single timestep
  at the schedule's centre) instead of N; without F_b = no two-branch gate (``gating: none``);
  without w_t = uniform stage weights. Rows on the trained SG model are recalibrated on the same
  held-out SOURCE normals as training (never target data). seg = pixel AUROC of the map; cls =
  image AUROC of the configured image score in rows with F_b (the gate is how detection reaches the
  map) and of the detection score s in rows without it (without the two-branch map, detection is
  the image-level output; this is how the paper's +M_t row can gain cls without F_b).

Results are kept per target and per seed as ``{"categories": {cat: {metric: v}}, "mean": {...}}``
(the mapping :mod:`dzad.reports` reads).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dzad.calibration import needs_labelled
from dzad.config import DZADConfig
from dzad.evaluation_outputs import mean_without_skipped
from dzad.launch import train_launched
from dzad.metrics import image_metrics
from dzad.reports import TABLE3_MARKS
from dzad.study.evaluations import evaluate_model, load_model, seed_file, seed_result
from dzad.study.layout import seed_dir, target_ref, with_seed
from dzad.study.models import source_labelled, source_normals
from dzad.study.summaries import KEY_METRICS, mean_std

log = logging.getLogger(__name__)

Result = dict[str, Any]
NPZ = "noise_features.npz"
# Table 3: the paper's check marks per row (SD is always there)
TABLE3_ROWS: tuple[dict[str, bool], ...] = (
    {"SD": True},
    {"SD": True, "SGSD": True},
    {"SD": True, "SGSD": True, "M_t": True},
    {"SD": True, "SGSD": True, "F_b": True},
    {"SD": True, "SGSD": True, "M_t": True, "w_t": True},
    {"SD": True, "SGSD": True, "M_t": True, "F_b": True, "w_t": True},
)
RESULT_KEYS = ("categories", "mean")


def trim(result: Mapping[str, Any]) -> Result:
    """Only the per-category and mean metrics of a ``metrics.json`` mapping."""
    return {k: result[k] for k in RESULT_KEYS}


def detection_result(result: Mapping[str, Any]) -> Result:
    """``result`` with its image metrics taken from the detection score s (pixel ones kept)."""
    det = result["variants"]["detection_score"]
    cats = {c: {**v, **det["categories"].get(c, {})} for c, v in result["categories"].items()}
    return {"categories": cats, "mean": {**result["mean"], **det["mean"]}}


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

    F = torch.from_numpy(np.asarray(npz["F"], np.float32))
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
    scores = rescore(F, tuple(names), alphas, k=k, mean=mean, std=std, learned=fitted)
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


# ------------------------------------------------------------------------------ model reruns
def _eval_cfg(cfg: DZADConfig) -> DZADConfig:
    """Reruns score DZAD only (controls are in the main evaluation) on ``ablation.max_images``."""
    n = cfg.ablation.max_images or cfg.evaluate.max_images
    return replace(cfg, evaluate=replace(cfg.evaluate, controls=False, figures=False, max_images=n))


def _reusable(cfg: DZADConfig) -> bool:
    """The main evaluation ran on the same images as the reruns."""
    return _eval_cfg(cfg).evaluate.max_images == cfg.evaluate.max_images


def ablation_targets(cfg: DZADConfig) -> list[str]:
    targets = list(cfg.ablation.targets) or list(cfg.sets.targets)
    for t in targets:
        target_ref(cfg, t)
    return targets


def timestep_results(
    cfg: DZADConfig,
    ckpts: Mapping[int, Path],
    eval_dirs: Mapping[str, Path],
    out_dir: Path,
) -> dict[str, dict[str, list[Result]]]:
    """Figure 4: ``{str(t_start): {target: [result per seed]}}``; the main evaluation's
    ``t_start`` is reused, not rerun."""
    out: dict[str, dict[str, list[Result]]] = {str(t): {} for t in cfg.ablation.t_starts}
    base = _eval_cfg(cfg)
    targets = ablation_targets(cfg)
    for seed, ckpt in ckpts.items():
        model = load_model(ckpt, with_seed(base, seed))
        trained = model.cfg
        for t in cfg.ablation.t_starts:
            if not 0 < t < trained.model.num_train_timesteps:
                raise ValueError(
                    f"ablation.t_starts: {t} is outside (0, T={trained.model.num_train_timesteps})"
                )
            at_t = model.with_settings(
                replace(trained, reconstruction=replace(trained.reconstruction, t_start=t))
            )
            for target in targets:
                if t == cfg.reconstruction.t_start and _reusable(cfg):
                    result = seed_result(eval_dirs[target], seed)
                else:
                    folder = seed_dir(out_dir / f"t_{t}" / target, seed)
                    result = evaluate_model(at_t, base, target, folder, controls=False)
                out[str(t)].setdefault(target, []).append(trim(result))
    return out


# ---------------------------------------------------------------------------------------- Table 3
def row_config(cfg: DZADConfig, flags: Mapping[str, bool]) -> DZADConfig:
    """The study config of one Table-3 row (see the module docstring)."""
    out = cfg
    if not flags.get("SGSD"):
        out = replace(
            out,
            model=replace(out.model, use_sg=False),
            detection=replace(out.detection, mode="self"),  # the other modes need the SG network
        )
    if not flags.get("M_t"):
        out = replace(out, noise=replace(out.noise, n_stages=1))
    if not flags.get("w_t"):
        out = replace(out, weighting=replace(out.weighting, name="uniform"))
    if not flags.get("F_b"):
        out = replace(out, anomaly_map=replace(out.anomaly_map, gating="none"))
    return out


def source_sets(cfg: DZADConfig, image_size: int):
    """The SOURCE images a Table-3 recalibration needs, loaded once for every row and seed:
    normals (an ``ImageSource``) and, when ``cfg`` needs it, the labelled split (images, labels)."""
    from dzad.calibration import ImageSource
    from dzad.data.dataset import ImageDataset

    mb = cfg.train.preload_max_mb
    normals = ImageSource(ImageDataset(source_normals(cfg), image_size, cfg.data), mb)
    labelled = None
    if needs_labelled(cfg):
        images, labels = source_labelled(cfg)
        labelled = (ImageSource(images, mb), torch.as_tensor(labels))
    return normals, labelled


def recalibrated(model, row_cfg: DZADConfig, normals, labelled=None):
    """``model`` with the row's noise bank, weighting and gate, calibrated on the same held-out
    SOURCE normals as training (:func:`dzad.calibration.split_holdout`, training seed).

    ``normals`` / ``labelled``: :func:`source_sets` of the study; the labelled split is used only
    when the row's calibration needs it.
    """
    from dzad.calibration import calibrate_on_source, split_holdout
    from dzad.model import DZAD
    from dzad.noise_features import NoiseBank

    trained = model.cfg
    cfg = replace(
        trained,
        noise=replace(row_cfg.noise, max_batch=trained.noise.max_batch),
        weighting=row_cfg.weighting,
        detection=row_cfg.detection,
        anomaly_map=row_cfg.anomaly_map,
    )
    same_bank = (cfg.noise.n_stages, cfg.noise.m_samples, cfg.noise.seed) == (
        trained.noise.n_stages, trained.noise.m_samples, trained.noise.seed
    )  # fmt: skip
    same_calibration = (cfg.weighting, cfg.detection, cfg.noise.views) == (
        trained.weighting, trained.detection, trained.noise.views
    )  # fmt: skip
    if same_bank and same_calibration:
        return model.with_settings(cfg)
    bank = model.bank
    if not same_bank:
        latent_shape = tuple(model.bank.noise.shape[2:])
        bank = NoiseBank.create(cfg.noise, cfg.model.num_train_timesteps, latent_shape)
    d = cfg.detection
    _, cal_idx = split_holdout(
        len(normals), d.calibration_holdout, d.calibration_max_images, trained.seed
    )
    calib = calibrate_on_source(
        cfg, model.net, model.encoder, bank, model.alphas_cumprod, normals, cal_idx,
        model.device, labelled, backbone=model.backbone,
    )  # fmt: skip
    return DZAD(cfg, model.encoder, model.net, bank, calib, model.backbone)


def architecture_results(
    cfg: DZADConfig,
    ckpts: Mapping[int, Path],
    eval_dirs: Mapping[str, Path],
    out_dir: Path,
) -> dict[str, list[dict[str, Any]]]:
    """Table 3: ``{target: [{"flags": {...}, "results": [result per seed]} per row]}``.

    The SD row trains its own model per seed (``out_dir/sd_model/seed_<s>``); the full row reuses
    the main evaluation when it ran on the same images.
    """
    base = _eval_cfg(cfg)
    targets = ablation_targets(cfg)
    rows: dict[str, list[dict[str, Any]]] = {
        t: [{"flags": dict(flags), "results": []} for flags in TABLE3_ROWS] for t in targets
    }
    sources = None  # SOURCE images for recalibration, loaded once for all rows and seeds
    for seed, ckpt in ckpts.items():
        main = load_model(ckpt, with_seed(base, seed))
        if sources is None:
            sources = source_sets(base, main.image_size)
        for i, flags in enumerate(TABLE3_ROWS):
            row_cfg = with_seed(row_config(base, flags), seed)
            name = "+".join(k for k in TABLE3_MARKS if flags.get(k))
            if not flags.get("SGSD"):
                sd_ckpt = seed_dir(out_dir / "sd_model", seed)
                train_launched(row_cfg, sd_ckpt)  # on train.processes processes
                model = load_model(sd_ckpt, row_cfg)
            else:
                model = recalibrated(main, row_cfg, *sources)
            for target in targets:
                if flags == TABLE3_ROWS[-1] and _reusable(cfg):
                    result = seed_result(eval_dirs[target], seed)
                else:
                    folder = seed_dir(out_dir / name / target, seed)
                    result = evaluate_model(model, base, target, folder, controls=False)
                use = trim(result) if flags.get("F_b") else detection_result(result)
                rows[target][i]["results"].append(use)
    return rows


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
