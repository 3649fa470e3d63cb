"""AUPRO speed: ``dzad.metrics.pixel_metrics`` against the slow threshold-sweep reference.

``python -m benchmarks.aupro [--n-maps 200] [--size 256] [--levels 256]`` prints one JSON line:
``{"bench": "aupro", "n_maps", "size", "levels", "fast_s", "reference_s", "speedup",
"max_abs_diff"}``. Maps take ``levels`` distinct values so the reference sweep is exact. The fast
time covers all three pixel metrics (pixel AUROC, pixel F1-max, AUPRO), as evaluation uses them.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import ndimage

from benchmarks._reference import aupro_reference
from dzad.metrics import pixel_metrics


def synthetic_maps(n: int, size: int, levels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks ``(n, size, size)`` with 0-3 blobs per image (half the images defect-free) and
    quantised maps ``(n, size, size)`` that are noisy but higher inside the blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n // 2, n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(size / 40, size / 8, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, 3, 3))
    raw = noise / noise.std() + 1.5 * ndimage.gaussian_filter(masks.astype(float), sigma=(0, 2, 2))
    edges = np.quantile(raw, np.linspace(0, 1, levels + 1)[1:-1])
    maps = (np.searchsorted(edges, raw) / (levels - 1)).astype(np.float32)
    return masks, maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-maps", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--levels", type=int, default=256)
    args = parser.parse_args()
    masks, maps = synthetic_maps(args.n_maps, args.size, args.levels)
    start = time.perf_counter()
    fast = pixel_metrics(masks, maps)["aupro"]
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = aupro_reference(masks, maps)
    reference_s = time.perf_counter() - start
    print(
        json.dumps(
            {
                "bench": "aupro",
                "n_maps": args.n_maps,
                "size": args.size,
                "levels": args.levels,
                "fast_s": round(fast_s, 4),
                "reference_s": round(reference_s, 4),
                "speedup": round(reference_s / fast_s, 2),
                "max_abs_diff": abs(fast - reference),
                "aupro": round(fast, 6),
            }
        )
    )


if __name__ == "__main__":
    main()
