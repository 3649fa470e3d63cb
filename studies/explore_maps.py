"""Exploration behind the real-image map choice (method.md §9.4): candidate maps of one checkpoint.

``python studies/explore_maps.py STUDY_DIR TARGET [--cache DIR] [--max-images K]`` (in a folder
where ``dvc repro`` ran a study: ``params.yaml``, ``models/seed_0``, ``data/cache``) prints one
JSON line: pixel AUROC (and image AUROC where a map has an image score) on TARGET's test split of

- ``configured``: the checkpoint's pipeline as the study configures it (map and detection s);
- ``stage_z``: the spatial noise error standardised per stage and weighted (eq. 13), i.e. the
  error map eq. 15's gate uses;
- ``position_z``: the same standardised per stage AND position with SOURCE normals;
- ``excess_m{M}``: :func:`dzad.detection.excess_map` (squared positive part of position_z) with
  M noise draws per stage, and ``excess_m{M}_gated``: divided by the two-branch gate;
- ``contrast``: the weighted error with the x0 hint minus that with the null hint;
- ``recon{t}_{cos,l2}``: latent distance to a DDIM reconstruction started at t;
- ``latent_mean``: distance of z0 from the SOURCE latents' mean (encoder only, no diffusion);
- the study's controls.

SOURCE statistics use ``--position-images`` seeded SOURCE normals. It is research tooling: it
reads the pipeline's parts directly and writes nothing.
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
from dzad.anomaly_map import base_map, excess_term, upsample
from dzad.calibration import position_subset
from dzad.data.dataset import ImageDataset
from dzad.detection import excess_map, weighted_map
from dzad.evaluation import build_controls, category_samples
from dzad.metrics import image_metrics, pixel_metrics
from dzad.noise_features import NoiseBank, noise_features
from dzad.reconstruction import image_seeds, reconstruct
from dzad.study.layout import target_cache
from dzad.study.seed_evaluation import load_model, source_control_batches


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study_dir", type=Path)
    p.add_argument("target")
    p.add_argument("--cache", type=Path, help="a preprocessed cache of TARGET (default: study's)")
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--position-images", type=int, default=128)
    p.add_argument("--m-samples", type=int, nargs="+", default=[1, 4])
    return p.parse_args()


def _position_stats(model, bank, src: torch.Tensor, z_src: torch.Tensor):
    """Calibration copy whose per-position statistics come from ``bank``'s errors on ``src``."""
    sp = noise_features(
        model.net, z_src, model.net.hint(src, z_src), bank, model.alphas_cumprod, 256
    ).spatial
    return dataclasses.replace(
        model.calibration, position_mean=sp.mean(0), position_std=sp.std(0).clamp_min(1e-12)
    )


def main() -> None:
    a = _args()
    torch.manual_seed(0)
    os.chdir(a.study_dir)
    cfg = config.load("params.yaml")
    model = load_model("models/seed_0", cfg, "cpu")
    cfg_eval = dataclasses.replace(cfg.evaluate, max_images=a.max_images)
    root = a.cache or target_cache(cfg, a.target)
    ds = ImageDataset(
        category_samples(root, a.target, cfg_eval, 0, False), model.image_size, cfg.data
    )
    # SOURCE normals read once: the controls refit on the same batches source_batches yields
    source = torch.cat(list(source_control_batches(cfg, model.image_size)()))
    controls = build_controls(model, cfg.evaluate, lambda: source.split(cfg.evaluate.batch_size))
    pos_cfg = dataclasses.replace(
        cfg, detection=dataclasses.replace(cfg.detection, position_images=a.position_images)
    )
    src = source[position_subset(len(source), pos_cfg)]
    shape = model.encoder.latent_shape(model.image_size)
    with torch.inference_mode():
        z_src = model.encoder.encode(src)
        banks = {
            m: NoiseBank.create(dataclasses.replace(cfg.noise, m_samples=m), 1000, shape)
            for m in a.m_samples
        }
        calibs = {m: _position_stats(model, b, src, z_src) for m, b in banks.items()}
    z_mean = z_src.mean((0, 2, 3), keepdim=True)
    z_std = z_src.std((0, 2, 3), keepdim=True)
    maps: dict[str, list] = {}
    scores: dict[str, list] = {}
    labels, masks = [], []

    def add(name: str, m: torch.Tensor, s: torch.Tensor | None = None) -> None:
        maps.setdefault(name, []).append(m.float()[:, 0] if m.ndim == 4 else m.float())
        if s is not None:
            scores.setdefault(name, []).append(s.float())

    for start in range(0, len(ds), 16):
        items = [ds[i] for i in range(start, min(start + 16, len(ds)))]
        x = torch.stack([it["image"] for it in items])
        labels += [it["label"] for it in items]
        masks.append(torch.stack([it["mask"] for it in items])[:, 0])
        size = tuple(x.shape[-2:])

        def up(e: torch.Tensor, size: tuple[int, int] = size) -> torch.Tensor:
            return upsample(e.unsqueeze(1), size)

        with torch.inference_mode():
            out = model(x)
            add("configured", out.anomaly_map, out.image_score)
            scores.setdefault("detection_s", []).append(out.detection_score)
            z0 = model.encoder.encode(x)
            det = model._detect(x, z0)
            calib = model.calibration
            err = weighted_map(det.spatial, calib)
            add("stage_z", up(err))
            gate = model.gate(det, size)
            for m, bank in banks.items():
                sp = noise_features(
                    model.net, z0, model.net.hint(x, z0), bank, model.alphas_cumprod, 256
                ).spatial
                c = calibs[m]
                z_pos = (sp - c.position_mean) / c.position_std
                if m == 1:
                    add("position_z", up(torch.einsum("bnhw,n->bhw", z_pos, c.weights)))
                ex = excess_map(sp, c)
                add(f"excess_m{m}", up(ex), ex.flatten(1).mean(1))
                add(f"excess_m{m}_gated", excess_term(ex, size, gate))
            null = noise_features(model.net, z0, None, model.bank, model.alphas_cumprod, 256)
            add("contrast", up(err - weighted_map(null.spatial, calib)))
            for t in (100, 250, 500):
                rc = dataclasses.replace(cfg.reconstruction, t_start=t)
                z_hat = reconstruct(
                    model.net,
                    z0,
                    x,
                    rc,
                    1000,
                    clamp_range=model.clamp_range,
                    alphas_cumprod=model.alphas_cumprod,
                    seeds=image_seeds(x, 1),
                )
                add(f"recon{t}_cos", base_map([z0], [z_hat], size))
                add(f"recon{t}_l2", base_map([z0], [z_hat], size, distance="l2"))
            add("latent_mean", up(((z0 - z_mean) / z_std).pow(2).mean(1)))
            for c in controls:
                if c.transductive:
                    continue
                s, cm = c.score(x)
                if cm is None:
                    scores.setdefault(f"control_{c.name}", []).append(s)
                else:
                    add(f"control_{c.name}", cm, s)
    y, mk = np.array(labels), torch.cat(masks).numpy() > 0
    res: dict[str, dict[str, float]] = {}
    for k, v in maps.items():
        res[k] = {"pixel_auroc": round(pixel_metrics(mk, torch.cat(v).numpy())["pixel_auroc"], 3)}
    for k, v in scores.items():
        res.setdefault(k, {})["image_auroc"] = round(
            image_metrics(y, torch.cat(v).numpy())["image_auroc"], 3
        )
    print(
        json.dumps(
            {"study": str(a.study_dir), "target": a.target, "images": len(ds), "results": res}
        )
    )


if __name__ == "__main__":
    main()
