"""Model reruns of the ablation stage (:mod:`dzad.study.ablations`): Figure 4 and Table 3.

- Figure 4: the whole evaluation again for every reconstruction start ``t_start`` in
  ``ablation.t_starts`` (DDIM from that timestep, docs/method.md §8); image and pixel AUROC.
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

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from dzad.calibration import needs_labelled
from dzad.config import DZADConfig
from dzad.reports import TABLE3_MARKS
from dzad.study.layout import seed_dir, source_cache_refs, target_ref, with_seed
from dzad.study.seed_evaluation import evaluate_model, load_model, seed_result
from dzad.study.seed_training import train_launched

Result = dict[str, Any]
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
    from dzad.data.dataset import ImageDataset
    from dzad.data.source import ImageSource, source_labelled, source_normals

    mb, refs = cfg.train.preload_max_mb, source_cache_refs(cfg)
    normals = source_normals(refs, skip_bad=cfg.data.skip_bad)
    labelled = None
    if needs_labelled(cfg):
        images, labels = source_labelled(refs, image_size, cfg.data)
        labelled = (ImageSource(images, mb), labels)
    return ImageSource(ImageDataset(normals, image_size, cfg.data), mb), labelled


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
