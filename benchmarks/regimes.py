"""Cost of the batch zero-shot regime (method.md §11.1): one batch of images, adaptation included.

``python -m benchmarks.regimes --model CKPT --images DIR [--n 100] [--regime-params FILE]
[--threads 2]`` loads ``n`` images from DIR (recursive; repeated when fewer) at the regime's size
and times :func:`dzad.regimes.score_batch` once (backbone features at every degree, the chunked
mutual distances, the DZAD copy's self-training and noise error, the fusion). Prints one JSON line:
``seconds`` (wall), ``cpu_seconds``, ``bound_s`` (300: method.md §11.2's bound for 100 images on 2
cores), the settings and ``peak_rss_mb``.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from benchmarks._common import add_common_args, emit, setup
from dzad.config import load
from dzad.data.images import load_image
from dzad.evaluation import control_backbone
from dzad.model import DZAD
from dzad.regimes import score_batch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--images", required=True, type=Path)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--regime-params", type=Path, default=None)
    add_common_args(ap)
    args = ap.parse_args()
    setup(args)
    model = DZAD.from_checkpoint(args.model)
    rc = load(args.regime_params).regime if args.regime_params else model.cfg.regime
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"{args.images}: no images")
    files = (files * (args.n // len(files) + 1))[: args.n]
    images = torch.stack([load_image(p, rc.image_size, model.cfg.data.resample) for p in files])
    backbone = control_backbone(model)
    cpu0, t0 = time.process_time(), time.perf_counter()
    score_batch(backbone, images, rc, model)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    emit(
        {
            "benchmark": "regimes",
            "images": args.n,
            "image_size": rc.image_size,
            "degrees": list(rc.degrees),
            "adapt_steps": rc.adapt_steps,
            "dzad_weight": rc.dzad_weight,
            "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu, 1),
            "bound_s": 300,
            "threads": torch.get_num_threads(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
    )


if __name__ == "__main__":
    main()
