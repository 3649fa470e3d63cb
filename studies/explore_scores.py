"""Exploration behind the real-image score choice: candidate image scores from trained checkpoints.

``python studies/explore_scores.py STUDY_DIR TARGET [--seeds 0 1 2] [--max-images K]`` (in a
folder where ``dvc repro`` trained a study: ``params.yaml``, ``models/seed_<s>``, ``data/cache``)
prints JSON lines: per seed and candidate, the image AUROC on TARGET's test split and on the SOURCE
test split (in-domain; ``--no-source`` skips it). Candidates, all from the checkpoint's own noise
features (M noise draws per stage, as configured), weights w_n of eq. 13, z the per-stage and
per-position standardisation of :func:`dzad.detection.excess_map`:

- ``s``: detection s (eq. 13, the study's image score); ``map``: the pooled max of the gated map;
  ``rank``: their rank fusion against the SOURCE reference scores (``anomaly_map.fusion: rank``);
- ``excess_mean`` / ``excess_max`` / ``excess_top{q}``: mean, max and mean of the top q% positions
  of the noise-excess map ``sum_n w_n max(z_n, 0)^2`` (latent grid, before gating);
- ``z_mean``: mean over positions of ``sum_n w_n z_n`` (s with per-position statistics);
  ``z_peak``: its top-5% mean minus its median (a local rise over the image's own level);
- ``tta_*``: the same averaged over 4 views (identity, h-flip, v-flip, both);
- ``detection``: with ``--mode prototype|contrast``, the recalibrated model's detection score in
  that mode (docs/method.md §7; prototype conditions from the SOURCE test split);
- ``learned``: s with weights fitted (logistic regression, eq. 13's learned w) on the SOURCE test
  split's labels: source data only, so it is a legitimate zero-shot choice.

Research tooling: it reads the pipeline's parts directly and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch

from dzad import config
from dzad.anomaly_map import excess_term, scaled, smooth
from dzad.data.dataset import ImageDataset
from dzad.detection import excess_map, self_score
from dzad.evaluation import category_samples
from dzad.metrics import image_metrics, pixel_metrics
from dzad.noise_features import VIEWS, flip_view
from dzad.scoring import image_score, pool_size, rank_fusion
from dzad.study.ablation_reruns import recalibrated, source_sets
from dzad.study.layout import source_caches, target_cache
from dzad.study.seed_evaluation import load_model
from dzad.weighting import fit_learned_weights, stage_means


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study_dir", type=Path)
    p.add_argument("target")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--no-source", action="store_true")
    p.add_argument("--no-tta", action="store_true")
    p.add_argument("--m-samples", type=int, help="recalibrate with this M (noise.m_samples)")
    p.add_argument("--views", nargs="+", help="recalibrate with these noise.views")
    p.add_argument("--mode", choices=["prototype", "contrast"], help="recalibrate: detection.mode")
    return p.parse_args()


def _top(x: torch.Tensor, q: float) -> torch.Tensor:
    """``(B,P)`` -> ``(B,)`` mean of the top ``q`` fraction."""
    k = max(1, round(q * x.shape[1]))
    return x.topk(k, dim=1).values.mean(1)


def _view_scores(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Candidate scores ``{name: (B,)}`` and stage means ``"_stage"`` ``(B,N)`` of one view."""
    calib = model.calibration
    det = model.features(x)
    sp = det.spatial.float()  # (B,N,h,w)
    z = (sp - calib.position_mean) / calib.position_std
    w = calib.weights.to(z)
    ex_map = excess_map(sp, calib)  # (B,h,w)
    ex = ex_map.flatten(1)  # (B,h*w)
    zw = torch.einsum("bnhw,n->bhw", z, w).flatten(1)  # (B,h*w)
    out = {
        "s": self_score(det.F, calib),
        "excess_mean": ex.mean(1),
        "excess_max": ex.amax(1),
        "excess_top5": _top(ex, 0.05),
        "excess_top20": _top(ex, 0.20),
        "z_mean": zw.mean(1),
        "z_peak": _top(zw, 0.05) - zw.median(1).values,
        "_stage": stage_means(det.F, *calib.stats()),
    }
    if model.cfg.detection.mode != "self":
        out["detection"] = det.detection_score
    size = (x.shape[-2], x.shape[-1])
    raw = excess_term(ex_map, size, model.gate(det, size))
    m = smooth(raw, scaled(model.cfg.anomaly_map.sigma, size[0]))
    k = pool_size(model.cfg.anomaly_map.pool_k, size[0])
    out["map"] = image_score(m, k, model.cfg.anomaly_map.pool_rounds)
    refs = model.fusion_references() or (None, None)
    out["rank"] = rank_fusion(out["map"], det.detection_score, *refs)
    out["_map_pixels"] = m[:, 0]
    return out


def _scores(model, ds: ImageDataset, tta: bool) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    labels, parts = [], {}
    for start in range(0, len(ds), 16):
        items = [ds[i] for i in range(start, min(start + 16, len(ds)))]
        x = torch.stack([it["image"] for it in items])
        labels += [it["label"] for it in items]
        parts.setdefault("_masks", []).append(torch.stack([it["mask"] for it in items])[:, 0])
        per = {v: _view_scores(model, flip_view(x, v)) for v in (VIEWS if tta else ["identity"])}
        for k, s in per["identity"].items():
            parts.setdefault(k, []).append(s)
        if tta:
            for v in ("hflip", "vflip", "hvflip"):
                for k in ("s", "map"):
                    parts.setdefault(f"{v}_{k}", []).append(per[v][k])
            for k in per["identity"]:
                parts.setdefault(f"tta_{k}", []).append(
                    torch.stack([p[k] for p in per.values()]).mean(0)
                )
    return np.array(labels), {k: torch.cat(v) for k, v in parts.items()}


def _aurocs(y: np.ndarray, scores: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {
        k: round(image_metrics(y, v.numpy())["image_auroc"], 4)
        for k, v in scores.items()
        if not k.startswith("_") and "__" not in k
    }
    mask = scores["_masks"].numpy() > 0
    out["pixel_map"] = round(pixel_metrics(mask, scores["_map_pixels"].numpy())["pixel_auroc"], 4)
    return out


def main() -> None:
    a = _args()
    torch.manual_seed(0)
    os.chdir(a.study_dir)
    cfg = config.load("params.yaml")
    cfg_eval = dataclasses.replace(cfg.evaluate, max_images=a.max_images)
    size = cfg.data.image_size
    samples = category_samples(target_cache(cfg, a.target), a.target, cfg_eval, 0, False)
    tgt = ImageDataset(samples, size, cfg.data)
    if not a.no_source:  # the SOURCE test split (in-domain), read once for every seed
        src_cat = cfg.sets.source[0].categories[0]
        samples = category_samples(source_caches(cfg)[0], src_cat, cfg_eval, 0, False)
        src = ImageDataset(samples, size, cfg.data)
    row_cfg = dataclasses.replace(
        cfg,
        noise=dataclasses.replace(
            cfg.noise,
            m_samples=a.m_samples or cfg.noise.m_samples,
            views=tuple(a.views or cfg.noise.views),
        ),
        detection=dataclasses.replace(cfg.detection, mode=a.mode or cfg.detection.mode),
    )
    sources = source_sets(row_cfg, size) if row_cfg != cfg else None  # to recalibrate
    res: dict[str, dict] = {}
    for seed in a.seeds:
        model = load_model(f"models/seed_{seed}", cfg, "cpu")
        if sources is not None:
            model = recalibrated(model, row_cfg, *sources)
        y_t, s_t = _scores(model, tgt, not a.no_tta)
        row = {"target": _aurocs(y_t, s_t)}
        if not a.no_source:
            y_s, s_s = _scores(model, src, False)
            row["source_test"] = _aurocs(y_s, s_s)
            w, b = fit_learned_weights(s_s["_stage"], torch.as_tensor(y_s), cfg.weighting.learned_c)
            row["learned_weights"] = [round(float(v), 3) for v in w]
            for name, key in (("learned", "_stage"), ("tta_learned", "tta__stage")):
                if key in s_t:
                    learned = (s_t[key] @ w + b).numpy()
                    row["target"][name] = round(image_metrics(y_t, learned)["image_auroc"], 4)
        res[str(seed)] = row
        print(json.dumps({"seed": seed, **row}), flush=True)
    keys = res[str(a.seeds[0])]["target"].keys()
    mean = {k: round(float(np.mean([res[str(s)]["target"][k] for s in a.seeds])), 4) for k in keys}
    out = {"study": str(a.study_dir), "target": a.target, "images": len(tgt), "mean": mean}
    if not a.no_source:
        skeys = res[str(a.seeds[0])]["source_test"].keys()
        out["source_mean"] = {
            k: round(float(np.mean([res[str(s)]["source_test"][k] for s in a.seeds])), 4)
            for k in skeys
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
