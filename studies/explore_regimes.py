"""Ablation of the scoring regimes (docs/method.md §11.1) on one target, reusing the backbone grids.

The backbone grids do not depend on the DZAD seed, so they are computed once per target and
cached (``--cache``); per checkpoint only the DZAD signal (frozen or adapted copy) is computed and
every fusion weight is scored from the same grids. Prints one JSON line per (checkpoint, regime,
setting) with image / pixel AUROC and AUPRO. Library functions only (dzad.regimes and friends).

    python studies/explore_regimes.py --data ROOT --category C --ckpt CKPT [--ckpt ...] \\
        --cache DIR [--max-images N] [--image-size S] [--steps 0 20 100] [--weights 0.1 0.25 0.5]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from dzad.backbones import build_backbone
from dzad.config import EvalConfig, RegimeConfig
from dzad.data.dataset import ImageDataset, collect_samples
from dzad.evaluation import category_samples
from dzad.metrics import MetricAccumulator
from dzad.model import DZAD
from dzad.mutual_scoring import (
    mutual_patch_scores,
    patch_features,
    reference_patch_scores,
    rescore_images,
    upsample,
)
from dzad.regime_evaluation import draw_references, seeded_groups
from dzad.regimes import dzad_grids, fuse


def metrics(labels, grids, masks, size, globs=None, k=0) -> dict[str, float]:
    """Image / pixel AUROC and AUPRO of ``grids`` ``(B,h,w)``; ``globs``: the descriptors of each
    scored group in order (their sizes split the batch), so that images are re-scored among their
    own group only, as :func:`dzad.regimes.score_batch` does."""
    acc = MetricAccumulator()
    scores = grids.flatten(1).amax(1)
    if globs is not None:
        parts = scores.split([len(g) for g in globs])
        scores = torch.cat([rescore_images(s, g, k) for s, g in zip(parts, globs, strict=True)])
    acc.add(labels, scores, masks, upsample(grids, size))
    r = acc.result()
    return {m: round(float(r[m]), 4) for m in ("image_auroc", "pixel_auroc", "aupro")}


def load(root, cat, size, max_images, cfg_data, split="test", samples=None):
    samples = samples or category_samples(root, cat, EvalConfig(max_images=max_images), 0, False)
    ds = ImageDataset(samples, size, cfg_data)
    items = [ds[i] for i in range(len(ds))]
    return (
        torch.stack([i["image"] for i in items]),
        torch.stack([i["mask"] for i in items]),
        torch.tensor([i["label"] for i in items]),
    )


def backbone_grids(args, rc, images, train_samples, cfg_data):
    """Cached: per group the mutual grid and descriptors; per draw the reference grids (of
    ``args.k`` references; K other than 4 cached in a file of their own beside the groups')."""
    path = Path(args.cache) / f"{args.category}_{rc.image_size}_{args.max_images}.pt"
    k_path = path.with_name(f"{path.stem}_k{args.k}.pt")
    bb = build_backbone("efficientnet_lite0")
    if path.exists():
        out = torch.load(path)
        if args.k == 4:
            return out
        if k_path.exists():
            return {**out, "draws": torch.load(k_path)}
        out["draws"] = reference_grids(args, rc, bb, images, train_samples, cfg_data)
        torch.save(out["draws"], k_path)
        return out
    out = {"groups": [], "draws": []}
    t0 = time.time()
    for g in seeded_groups(len(images), rc.group_size, rc.seed):
        feats, glob = patch_features(bb, images[g], rc.levels, rc.degrees)
        grids = {
            r: mutual_patch_scores(f, rc.mutual_fraction)
            for r, f in zip(rc.degrees, feats, strict=True)
        }
        out["groups"].append({"index": torch.as_tensor(g), "grids": grids, "glob": glob})
    out["draws"] = reference_grids(args, rc, bb, images, train_samples, cfg_data)
    out["seconds"] = time.time() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path if args.k == 4 else k_path)
    return out


def reference_grids(args, rc, bb, images, train_samples, cfg_data) -> list[dict]:
    """Per draw of ``args.k`` references: the grids of every degree and the references."""
    feats, _ = patch_features(bb, images, rc.levels, rc.degrees)
    draws = []
    for d in range(rc.few_shot_draws):
        refs = draw_references(train_samples, args.k, rc.seed + d)
        ref_images, _, _ = load(None, None, rc.image_size, 0, cfg_data, samples=refs)
        rfeats, _ = patch_features(bb, ref_images, rc.levels, rc.degrees)
        grids = {
            r: reference_patch_scores(f, q)
            for r, f, q in zip(rc.degrees, feats, rfeats, strict=True)
        }
        draws.append({"grids": grids, "refs": ref_images})
    return draws


def target_args() -> argparse.ArgumentParser:
    """The options every exploration script shares: the target, checkpoints, cache, subset, K, the
    fusion weights and the input size."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--ckpt", nargs="*", default=[])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--max-images", type=int, default=0)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--weights", type=float, nargs="*", default=[0.1, 0.25, 0.5])
    ap.add_argument("--image-size", type=int, default=RegimeConfig().image_size)
    return ap


def target_grids(args: argparse.Namespace, rc: RegimeConfig):
    """The target's test images, masks and labels at ``rc.image_size`` and its cached backbone
    grids (every exploration script starts here)."""
    from dzad.config import DataConfig

    cfg_data = DataConfig(image_size=rc.image_size, mask_threshold=127)
    images, masks, labels = load(args.data, args.category, rc.image_size, args.max_images, cfg_data)
    train = collect_samples(args.data, (args.category,), ("train",))
    return images, masks, labels, backbone_grids(args, rc, images, train, cfg_data)


def main() -> None:
    ap = target_args()
    ap.add_argument("--steps", type=int, nargs="*", default=[0, 20, 100])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rc = replace(RegimeConfig(), adapt_rounds=args.rounds, image_size=args.image_size)
    images, masks, labels, cache = target_grids(args, rc)
    size = rc.image_size
    emit = lambda **kw: print(json.dumps({**kw, "size": size}), flush=True)  # noqa: E731
    emit(what="backbone_seconds", seconds=round(cache["seconds"], 1), n=len(images))
    # batch zero-shot, backbone only (= the mutual control): degrees and re-scoring
    order = torch.cat([g["index"] for g in cache["groups"]])
    lab, msk = labels[order], masks[order]
    glob = [g["glob"] for g in cache["groups"]]
    for degs in [(1,), (3,), tuple(rc.degrees)]:
        grid = torch.cat(
            [torch.stack([g["grids"][r] for r in degs]).mean(0) for g in cache["groups"]]
        )
        for k in (0, 5):
            emit(regime="batch", part="backbone", degrees=degs, rescore_k=k,
                 **metrics(lab, grid, msk, size, glob, k))  # fmt: skip
    for d in cache["draws"]:
        for degs in [(3,), tuple(rc.degrees)]:
            grid = torch.stack([d["grids"][r] for r in degs]).mean(0)
            emit(regime="few", part="backbone", degrees=degs, **metrics(labels, grid, masks, size))
    for ckpt in args.ckpt:
        model = DZAD.from_checkpoint(ckpt)
        for steps in args.steps:
            rcs = replace(rc, adapt_steps=steps)
            t0 = time.time()
            bgrid, dgrid = [], []
            for g in cache["groups"]:
                idx = g["index"]
                bg = torch.stack([g["grids"][r] for r in rc.degrees]).mean(0)
                dz, _ = dzad_grids(model, images[idx], None, rcs)
                bgrid.append(fuse(bg, None, 0)), dgrid.append(dz)
            secs = round(time.time() - t0, 1)
            emit(ckpt=ckpt, regime="batch", part="dzad", steps=steps, seconds=secs,
                 **metrics(lab, torch.cat(dgrid), msk, size))  # fmt: skip
            for w in args.weights:
                fused = torch.cat([fuse(b, d, w) for b, d in zip(bgrid, dgrid, strict=True)])
                for k in (0, 5):
                    emit(ckpt=ckpt, regime="batch", part="fusion", steps=steps, weight=w,
                         rescore_k=k, **metrics(lab, fused, msk, size, glob, k))  # fmt: skip
            for i, d in enumerate(cache["draws"]):
                bg = torch.stack([d["grids"][r] for r in rc.degrees]).mean(0)
                dz, _ = dzad_grids(model, images, d["refs"], rcs)
                emit(ckpt=ckpt, regime="few", draw=i, part="dzad", steps=steps,
                     **metrics(labels, dz, masks, size))  # fmt: skip
                for w in args.weights:
                    emit(ckpt=ckpt, regime="few", draw=i, part="fusion", steps=steps, weight=w,
                         **metrics(labels, fuse(bg, dz, w), masks, size))  # fmt: skip


if __name__ == "__main__":
    main()
