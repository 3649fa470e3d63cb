"""Batch regime: let the DZAD image scores choose which images serve as mutual references.

MuSc's interval averaging assumes that a patch's closest images are mostly normal. On the dev
targets most TEST images are anomalous (mpdd_metal_plate 81 of 107, magnetic_tile 392 of 583),
so a defect patch often finds its closest matches in other images with the same kind of defect
and scores low. Here each image's mutual score is taken only over reference images that a
detector judges normal: the images whose image score is in the top ``q`` of the group are left
out as references (they are still scored). Two detectors choose:

- ``dzad``: the batch-adapted DZAD copy's image score (max of its noise-excess grid, the cached
  grids of ``explore_fusions.py``);
- ``self``: the backbone's own mutual image score (a two-pass MuSc), the parity ablation that
  says whether the gain, if any, comes from DZAD or from the exclusion itself.

The per-pair nearest-patch distances ``(B, P, B)`` of every group and degree are computed once
(library ``nearest_per_image``) and cached, so every ``q`` is cheap. One JSON line per
(detector, checkpoint, q, re-scoring k), ``part`` naming the variant, for summarise_regimes.py;
``+reweight`` / ``+agree``: the selected grid then re-weighted by the DZAD grid
(``explore_fusions.reweight``) at each ``--weights`` value.

    python studies/explore_reference_selection.py --data ROOT --category C --cache DIR \\
        --ckpt CKPT [...] [--max-images N] [--image-size 256] [--drop 0.2 0.4 0.6]
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from itertools import product
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
from explore_fusions import dz_cache_stem, reweight
from explore_regimes import metrics, target_args, target_grids

from dzad.backbones import build_backbone
from dzad.config import RegimeConfig
from dzad.mutual_scoring import interval_count, nearest_per_image, patch_features


def pair_distances(args, rc: RegimeConfig, images: Tensor, cache: dict) -> list[dict]:
    """Per group ``{degree: (B, P, B)}``: patch p of image i to its nearest patch in image j."""
    path = Path(args.cache) / f"pairs_{args.category}_{rc.image_size}_{args.max_images}.pt"
    if path.exists():
        return torch.load(path)
    bb = build_backbone("efficientnet_lite0")
    out = []
    for g in cache["groups"]:
        feats, _ = patch_features(bb, images[g["index"]], rc.levels, rc.degrees)
        per = {}
        for r, f in zip(rc.degrees, feats, strict=True):
            flat = f.flatten(1, 2).float()  # (B, P, C)
            per[r] = torch.stack([nearest_per_image(flat[i], flat) for i in range(len(flat))])
        out.append(per)
    torch.save(out, path)
    return out


def scores_with_references(d: Tensor, keep: Tensor, fraction: float) -> Tensor:
    """``d`` ``(B, P, B)``, ``keep`` ``(B,)`` bool: which images may serve as references ->
    ``(B, P)``: the mean of the closest ``fraction`` of the kept images other than itself."""
    b_ = d.shape[0]
    out = torch.empty(b_, d.shape[1])
    for i in range(b_):
        refs = keep.clone()
        refs[i] = False
        if refs.sum() < 1:  # nothing left: fall back to every other image
            refs = torch.ones(b_, dtype=torch.bool)
            refs[i] = False
        di = d[i][:, refs]
        out[i] = di.topk(interval_count(fraction, di.shape[1]), dim=1, largest=False).values.mean(1)
    return out


def keep_mask(image_scores: Tensor, drop: float) -> Tensor:
    """``(B,)`` bool: False for the ``drop`` fraction of images with the highest scores."""
    n_drop = round(drop * len(image_scores))
    keep = torch.ones(len(image_scores), dtype=torch.bool)
    if n_drop:
        keep[image_scores.topk(n_drop).indices] = False
    return keep


def grid_for(pairs: dict, keep: Tensor, rc: RegimeConfig, side: int) -> Tensor:
    """Degrees averaged, ``(B, side, side)``."""
    per = [scores_with_references(pairs[r], keep, rc.mutual_fraction) for r in rc.degrees]
    return torch.stack(per).mean(0).view(-1, side, side)


def dzad_batch_grids(args, ckpt: str, rc: RegimeConfig) -> list[Tensor]:
    """The cached batch DZAD grids ``[(B, h', w')]`` per group of ``explore_fusions.py``."""
    rc = replace(rc, adapt_steps=args.steps)
    return torch.load(f"{dz_cache_stem(args, ckpt, rc)}.batch.pt")


def rank(x: Tensor) -> Tensor:
    """``(B,)`` -> ranks scaled to [0, 1]."""
    return x.argsort().argsort().float() / max(1, len(x) - 1)


def main() -> None:
    ap = target_args()
    ap.add_argument("--drop", type=float, nargs="*", default=[0.2, 0.4, 0.6])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    rc = replace(RegimeConfig(), image_size=args.image_size)
    images, masks, labels, cache = target_grids(args, rc)
    size = rc.image_size
    emit = lambda **kw: print(json.dumps({**kw, "size": size}), flush=True)  # noqa: E731
    t0 = time.time()
    pairs = pair_distances(args, rc, images, cache)
    emit(what="pair_seconds", seconds=round(time.time() - t0, 1))
    order = torch.cat([g["index"] for g in cache["groups"]])
    lab, msk = labels[order], masks[order]
    glob = [g["glob"] for g in cache["groups"]]
    side = cache["groups"][0]["grids"][rc.degrees[0]].shape[-1]
    everyone = [grid_for(p, torch.ones(len(g["index"]), dtype=torch.bool), rc, side)
                for p, g in zip(pairs, cache["groups"], strict=True)]  # fmt: skip
    cached = torch.cat(
        [torch.stack([g["grids"][r] for r in rc.degrees]).mean(0) for g in cache["groups"]]
    )
    emit(what="control_matches_cache", max_abs=float((torch.cat(everyone) - cached).abs().max()))
    for k in (0, 5):
        emit(regime="batch", part="backbone", degrees=list(rc.degrees), rescore_k=k,
             **metrics(lab, torch.cat(everyone), msk, size, glob, k))  # fmt: skip
    own = [e.flatten(1).amax(1) for e in everyone]
    # (part, checkpoint, image scores per group, DZAD grids per group)
    detectors: list[tuple[str, str, list[Tensor], list[Tensor]]] = [("select_self", "", own, [])]
    for ckpt in args.ckpt:
        dz = dzad_batch_grids(args, ckpt, rc)
        scores = [g.flatten(1).amax(1).float() for g in dz]
        both = [(rank(a) + rank(b)) / 2 for a, b in zip(own, scores, strict=True)]
        detectors += [("select_dzad", ckpt, scores, dz), ("select_both", ckpt, both, dz)]
    for part, ckpt, image_scores, dz in detectors:
        tag = {"ckpt": ckpt} if ckpt else {}
        for q in args.drop:
            parts = [grid_for(p, keep_mask(s, q), rc, side)
                     for p, s in zip(pairs, image_scores, strict=True)]  # fmt: skip
            for k in (0, 5):
                emit(**tag, regime="batch", part=part, weight=q, steps=args.steps, rescore_k=k,
                     **metrics(lab, torch.cat(parts), msk, size, glob, k))  # fmt: skip
            for w, form in product(args.weights if dz else [], ("reweight", "agree")):
                rw = torch.cat([reweight(g, d, w, form == "agree")
                                for g, d in zip(parts, dz, strict=True)])  # fmt: skip
                emit(**tag, regime="batch", part=f"{part}+{form}", weight=q, rw=w,
                     steps=args.steps, **metrics(lab, rw, msk, size))  # fmt: skip


if __name__ == "__main__":
    main()
