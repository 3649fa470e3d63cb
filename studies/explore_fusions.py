"""Other ways to combine the DZAD signal with the backbone in the regimes (docs/method.md §11.1).

``explore_regimes.py`` measured the additive map fusion (``dzad.regimes.fuse``). This script
measures, on the same cached backbone grids, that form (``additive``) and four others (``w`` =
DZAD weight):

- ``image``: the pixel map is the backbone's alone; only the image score mixes in DZAD:
  ``(1 - w) z(max bb) + w z(max dz)`` (z: median / MAD over the scored images);
- ``reweight``: the backbone's mutual distances re-weighted per patch by the DZAD excess,
  ``bb * (1 + w * max(z(dz), 0))`` (z over every patch of the batch, DZAD grid resized onto the
  backbone grid), so DZAD can only amplify what the backbone already sees;
- ``reweight+image``: both;
- ``agree``: re-weighted only where both agree, ``bb * (1 + w * max(min(z(bb), z(dz)), 0))``
  (z as in ``reweight``), so a patch that only DZAD finds high is not amplified.

The DZAD grids (``dzad.regimes.dzad_grids``, frozen or adapted copy; ``--tiles n``: the copy
scores n x n tiles of each image at its own size, ``regime.dzad_tiles``) are cached per
checkpoint, steps, tiles, input size (``--image-size``) and adaptation settings (``--rounds``,
``--drop``, ``--lr``: ``regime.adapt_*``) under ``--cache`` beside the backbone grids. One JSON
line per (checkpoint, regime, form, weight, draw) with image / pixel AUROC and AUPRO and the
seconds the DZAD grids took (0 when read from the cache); ``part`` = the form (``dzad``: the DZAD
grid alone), for summarise_regimes.py.

    python studies/explore_fusions.py --data ROOT --category C --ckpt CKPT [...] --cache DIR \\
        [--max-images N] [--image-size 256] [--steps 20] [--tiles 1] [--rounds 2] [--drop 0.2] \\
        [--lr 1e-4] [--weights 0.1 0.25 0.5] [--regimes batch few]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
from explore_regimes import metrics, target_args, target_grids

from dzad.adaptation import adapt_network, encode, excess_grid, noise_error, to_model_size
from dzad.config import RegimeConfig
from dzad.metrics import MetricAccumulator
from dzad.model import DZAD
from dzad.mutual_scoring import upsample
from dzad.regimes import dzad_grids, fuse, robust_scale


def reweight(bb: Tensor, dz: Tensor, w: float, agree: bool = False) -> Tensor:
    """``bb`` ``(B,h,w)`` amplified where the DZAD grid ``dz`` ``(B,h',w')`` is high (``agree``:
    where both are)."""
    z = robust_scale(F.interpolate(dz[:, None].float(), size=bb.shape[-2:], mode="bilinear")[:, 0])
    if agree:
        z = torch.minimum(z, robust_scale(bb))
    return bb * (1 + w * z.clamp_min(0))


def image_mix(grid: Tensor, dz: Tensor, w: float) -> Tensor:
    """Image scores ``(B,)``: the map's max and the DZAD grid's max, each z-scored, mixed."""
    return (1 - w) * robust_scale(grid.flatten(1).amax(1)) + w * robust_scale(dz.flatten(1).amax(1))


def score(labels, grid, masks, size, image: Tensor | None = None) -> dict[str, float]:
    if image is None:
        return metrics(labels, grid, masks, size)
    acc = MetricAccumulator()
    acc.add(labels, image, masks, upsample(grid, size))
    r = acc.result()
    return {m: round(float(r[m]), 4) for m in ("image_auroc", "pixel_auroc", "aupro")}


def forms(bb: Tensor, dz: Tensor, w: float) -> dict[str, tuple[Tensor, Tensor | None]]:
    rw = reweight(bb, dz, w)
    return {
        "additive": (fuse(bb, dz, w), None),
        "image": (bb, image_mix(bb, dz, w)),
        "reweight": (rw, None),
        "reweight+image": (rw, image_mix(rw, dz, w)),
        "agree": (reweight(bb, dz, w, agree=True), None),
    }


def shifted(images: Tensor, dy: int, dx: int) -> Tensor:
    """``(B,3,m,m)`` sampled at ``(y + dy, x + dx)`` (edges replicated): content moves up-left."""
    p, m = max(abs(dy), abs(dx)), images.shape[-1]
    padded = F.pad(images, (p, p, p, p), mode="replicate")
    return padded[:, :, p + dy : p + dy + m, p + dx : p + dx + m]


def shift_grids(model: DZAD, images: Tensor, rc: RegimeConfig, s: int) -> Tensor:
    """Batch DZAD grid ``(B, s*h, s*w)`` by shift-and-stitch at the model's TRAINING scale.

    The whole image at the model's size (as tiles = 1), seen at ``s x s`` sub-cell shifts
    (offsets centred so that each view's cells are the centres of the fine grid's cells); the
    copy is adapted on all views (same steps), their noise errors interleaved, then the excess.
    Unlike tiles, no view is zoomed, so only the grid's coarseness changes.
    """
    x = to_model_size(images, model.image_size)
    cell = model.image_size // encode(model, x[:1])[1].shape[-1]
    offs = [round((k + 0.5) * cell / s - cell / 2) for k in range(s)]  # s = 2, cell 16: -4, 4
    views = torch.stack([shifted(x, dy, dx) for dy in offs for dx in offs], 1).flatten(0, 1)
    x0, z0 = encode(model, views)
    net = model.net
    if rc.adapt_steps > 0:
        net, _ = adapt_network(model, x0, z0, rc, robust=True)
    err = noise_error(model, net, x0, z0)  # (B*s*s,N,h,w)
    b, n, h, w = len(images), *err.shape[1:]
    fine = err.view(b, s, s, n, h, w).permute(0, 3, 4, 1, 5, 2).reshape(b, n, h * s, w * s)
    return excess_grid(fine, fine, model.calibration.weights).cpu()


def dz_cache_stem(args: argparse.Namespace, ckpt: str, rc: RegimeConfig) -> str:
    """Where the DZAD grids of ``ckpt`` on this target are cached (``<stem>.batch.pt`` /
    ``.few.pt``): named by every setting they depend on, defaults left out of the name."""
    default = RegimeConfig()
    parts = [
        "" if rc.dzad_tiles == 1 else f"_t{rc.dzad_tiles}",
        "" if getattr(args, "shifts", 1) == 1 else f"_s{args.shifts}",
        "" if args.k == 4 else f"_k{args.k}",
        "" if rc.image_size == 256 else f"_px{rc.image_size}",
        "" if rc.adapt_rounds == default.adapt_rounds else f"_r{rc.adapt_rounds}",
        "" if rc.adapt_drop == default.adapt_drop else f"_d{rc.adapt_drop:g}",
        "" if rc.adapt_lr == default.adapt_lr else f"_lr{rc.adapt_lr:g}",
    ]
    name = f"dz_{args.category}_{Path(ckpt).name}_{rc.adapt_steps}_{args.max_images}"
    return str(Path(args.cache) / (name + "".join(parts)))


def cached_dzad(path: Path, fn) -> tuple[list[Tensor], float]:
    """The DZAD grids (from ``path`` when there) and the seconds computing them took."""
    if path.exists():
        return torch.load(path), 0.0
    t0 = time.time()
    out = fn()
    torch.save(out, path)
    return out, round(time.time() - t0, 1)


def main() -> None:
    ap = target_args()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiles", type=int, default=1)
    ap.add_argument("--shifts", type=int, default=1, help="> 1: shift_grids (batch), not tiles")
    ap.add_argument("--regimes", nargs="*", default=["batch", "few"])
    ap.add_argument("--rounds", type=int, default=RegimeConfig().adapt_rounds)
    ap.add_argument("--drop", type=float, default=RegimeConfig().adapt_drop)
    ap.add_argument("--lr", type=float, default=RegimeConfig().adapt_lr)
    args = ap.parse_args()
    rc = replace(
        RegimeConfig(), adapt_steps=args.steps, dzad_tiles=args.tiles, image_size=args.image_size,
        adapt_rounds=args.rounds, adapt_drop=args.drop, adapt_lr=args.lr,
    )  # fmt: skip
    images, masks, labels, cache = target_grids(args, rc)
    size = rc.image_size
    emit = lambda **kw: print(json.dumps(kw), flush=True)  # noqa: E731
    order = torch.cat([g["index"] for g in cache["groups"]])
    if args.shifts > 1:
        grids = lambda m, x, _, c: (shift_grids(m, x, c, args.shifts), {})  # noqa: E731
    else:
        grids = dzad_grids
    lab, msk = labels[order], masks[order]
    for ckpt in args.ckpt:
        model = DZAD.from_checkpoint(ckpt)
        stem = dz_cache_stem(args, ckpt, rc)
        tag = {"ckpt": ckpt, "steps": args.steps, "tiles": args.tiles, "shifts": args.shifts,
               "k": args.k, "size": size, "rounds": rc.adapt_rounds, "drop": rc.adapt_drop,
               "lr": rc.adapt_lr}  # fmt: skip
        if "batch" in args.regimes:
            groups, secs = cached_dzad(
                Path(f"{stem}.batch.pt"),
                lambda m=model: [
                    grids(m, images[g["index"]], None, rc)[0] for g in cache["groups"]
                ],
            )
            bbs = [
                torch.stack([g["grids"][r] for r in rc.degrees]).mean(0) for g in cache["groups"]
            ]
            emit(**tag, regime="batch", part="dzad", seconds=secs,
                 **score(lab, torch.cat(groups), msk, size))  # fmt: skip
            for w in args.weights:
                per_form: dict[str, list] = {}
                for bb, dz in zip(bbs, groups, strict=True):
                    for name, (grid, img) in forms(bb, dz, w).items():
                        per_form.setdefault(name, []).append((grid, img))
                for name, parts in per_form.items():
                    grid = torch.cat([p[0] for p in parts])
                    img = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
                    emit(**tag, regime="batch", part=name, weight=w, seconds=secs,
                         **score(lab, grid, msk, size, img))  # fmt: skip
        if "few" in args.regimes:
            dzs, secs = cached_dzad(
                Path(f"{stem}.few.pt"),
                lambda m=model: [dzad_grids(m, images, d["refs"], rc)[0] for d in cache["draws"]],
            )
            for i, (d, dz) in enumerate(zip(cache["draws"], dzs, strict=True)):
                bb = torch.stack([d["grids"][r] for r in rc.degrees]).mean(0)
                emit(**tag, regime="few", draw=i, part="dzad", seconds=secs,
                     **score(labels, dz, masks, size))  # fmt: skip
                for w in args.weights:
                    for name, (grid, img) in forms(bb, dz, w).items():
                        emit(**tag, regime="few", draw=i, part=name, weight=w, seconds=secs,
                             **score(labels, grid, masks, size, img))  # fmt: skip


if __name__ == "__main__":
    main()
