"""Scaling: wall time of ``dzad evaluate`` (``dzad.evaluation.evaluate``) on 50, 100, 200 images.

``python -m benchmarks.scaling [--sizes 50 100 200] [--quick]`` prints one JSON line. One
calibrated ``demo``-study model (random weights) evaluates synthetic MVTec-layout categories of each
size (half defect images with masks; metrics, scores, figures, no controls) after a small warm-up
run, in ``--repeats`` interleaved rounds; a least-squares line through (images, median seconds)
gives ``slope_s_per_image``, the intercept and ``slope_r2`` (1 = perfectly linear) on the wall
clock; ``slope_r2_cpu`` is the same fit on this process's CPU time, which other jobs on a shared
machine do not perturb. ``images_per_s`` = 1 / slope.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._common import (
    Span,
    add_common_args,
    build_model,
    demo_config,
    emit,
    median_span,
    setup,
    stopwatch,
    write_mvtec,
)

CATEGORY = "synthetic"


def fit_line(x: list[int] | list[float], y: list[float]) -> tuple[float, float, float]:
    """Least-squares ``y = slope * x + intercept``; returns (slope, intercept, r^2)."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(xs, ys, 1)
    residual = ys - (slope * xs + intercept)
    total = ((ys - ys.mean()) ** 2).sum()
    r2 = 1.0 - (residual**2).sum() / total if total > 0 else float("nan")
    return float(slope), float(intercept), float(r2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all sizes; medians")
    add_common_args(parser)
    args = parser.parse_args()
    setup(args)
    from dzad.evaluation import evaluate

    sizes = [4, 8, 12] if args.quick else args.sizes
    cfg = demo_config(quick=args.quick)
    model = build_model(cfg, n_source=4 if args.quick else 16)
    runs: dict[int, list[Span]] = {n: [] for n in sizes}
    with tempfile.TemporaryDirectory(prefix="dzad-bench-") as tmp:
        work = Path(tmp)
        warm = write_mvtec(work / "warm", CATEGORY, 4, cfg.data.image_size, seed=7)
        evaluate(model, warm, [CATEGORY], work / "out_warm", cfg.evaluate)
        roots = {
            n: write_mvtec(work / f"mvtec_{n}", CATEGORY, n, cfg.data.image_size) for n in sizes
        }
        for r in range(1 if args.quick else args.repeats):  # rounds: load drifts hit every size
            for n in sizes:
                lap = stopwatch()
                evaluate(model, roots[n], [CATEGORY], work / f"out_{n}_{r}", cfg.evaluate)
                runs[n].append(lap())
    spans = [median_span(runs[n]) for n in sizes]
    slope, intercept, r2 = fit_line(sizes, [s.wall for s in spans])
    slope_cpu, _, r2_cpu = fit_line(sizes, [s.cpu for s in spans])
    emit(
        {
            "bench": "scaling",
            "sizes": sizes,
            "seconds": [round(s.wall, 3) for s in spans],
            "cpu_seconds": [round(s.cpu, 3) for s in spans],
            "slope_s_per_image": slope,
            "intercept_s": intercept,
            "slope_r2": r2,
            "slope_cpu_s_per_image": slope_cpu,
            "slope_r2_cpu": r2_cpu,
            "images_per_s": 1 / slope if slope > 0 else None,
        }
    )


if __name__ == "__main__":
    main()
