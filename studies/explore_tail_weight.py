"""Batch regime: a fusion weight set per batch from the signals themselves, with no labels.

Anomalies are sparse, so a signal that carries them should have a heavier upper tail over the
batch's patches than one that does not. For each scored group this script takes ``T(s)``, the
``--q`` quantile of the robust z-scores (median / MAD over every patch of the group,
``dzad.regimes.robust_scale``) of the backbone grid and of the adapted DZAD grid, and fuses them
with the DZAD weight ``T(dz) / (T(bb) + T(dz))`` (``additive``, ``dzad.regimes.fuse``) or
re-weights the backbone by ``0.25 * T(dz) / T(bb)`` (``reweight``, ``explore_fusions.reweight``).
Nothing is chosen on any target: the weight comes from the batch's own grids.

It reads the cached grids of ``explore_regimes.py`` / ``explore_fusions.py`` (run those first, same
``--cache``, ``--max-images``, ``--steps`` and ``--lr``). One JSON line per checkpoint with each
group's ``(T(bb), T(dz), weight)`` and both forms' image / pixel AUROC and AUPRO.

    python studies/explore_tail_weight.py --data ROOT --category C --cache DIR --ckpt CKPT [...] \\
        [--max-images N] [--steps 20] [--lr 1e-4] [--q 0.99]
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
from explore_fusions import dz_cache_stem, reweight, score
from explore_regimes import target_args, target_grids

from dzad.config import RegimeConfig
from dzad.regimes import fuse, robust_scale


def tail(grid: Tensor, q: float) -> float:
    """The ``q`` quantile of the robust z-scores of every patch of ``grid`` ``(B,h,w)`` (a seeded
    sample of 200 000 when larger: ``torch.quantile``'s input limit)."""
    z = robust_scale(grid).flatten()
    pick = torch.randperm(len(z), generator=torch.Generator().manual_seed(0))[:200_000]
    return float(torch.quantile(z[pick], q))


def main() -> None:
    ap = target_args()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=RegimeConfig().adapt_lr)
    ap.add_argument("--q", type=float, default=0.99)
    args = ap.parse_args()
    args.shifts = 1  # dz_cache_stem's name for whole-image grids
    rc = replace(
        RegimeConfig(), adapt_steps=args.steps, image_size=args.image_size, adapt_lr=args.lr
    )
    _, masks, labels, cache = target_grids(args, rc)
    order = torch.cat([g["index"] for g in cache["groups"]])
    lab, msk = labels[order], masks[order]
    bbs = [torch.stack([g["grids"][r] for r in rc.degrees]).mean(0) for g in cache["groups"]]
    for ckpt in args.ckpt:
        dzs = torch.load(f"{dz_cache_stem(args, ckpt, rc)}.batch.pt")
        stats, additive, rew = [], [], []
        for bb, dz in zip(bbs, dzs, strict=True):
            tb, td = tail(bb, args.q), tail(dz, args.q)
            stats.append([round(tb, 2), round(td, 2), round(td / (tb + td), 3)])
            additive.append(fuse(bb, dz, td / (tb + td)))
            rew.append(reweight(bb, dz, 0.25 * td / tb))
        line = {"ckpt": ckpt, "q": args.q, "groups": stats}
        line["additive"] = score(lab, torch.cat(additive), msk, rc.image_size)
        line["reweight"] = score(lab, torch.cat(rew), msk, rc.image_size)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
