"""Peak memory: scoring 1,000 images against 100, each run in a fresh process.

``python -m benchmarks.memory [--small 100] [--large 1000] [--paths score evaluate] [--quick]``
prints one JSON line. A calibrated ``demo``-study checkpoint (random weights) and synthetic 64 px
PNGs are written once; then, per path and image count, a child process loads the checkpoint and
runs either the ``dzad score`` command function (heat maps and ``scores.csv`` written as batches
finish) or the library's ``dzad.evaluation.evaluate`` (metrics accumulated, figures, no controls),
and reports its peak RSS (``ru_maxrss``) and its RSS just before scoring. ``rss_ratio`` is the
``score`` path's large/small peak ratio (bar 1.10); ``rss_ratio_evaluate`` the evaluation's.
``rss_growth_mb_*`` is peak minus the pre-scoring RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import (
    REPO,
    add_common_args,
    build_model,
    demo_config,
    emit,
    link_images,
    setup,
    stopwatch,
    write_mvtec,
    write_pngs,
)

CATEGORY = "synthetic"


def _rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(path: str, n: int, work: Path) -> dict[str, float]:
    """Score ``n`` images along ``path`` in this process; peak and pre-scoring RSS in MiB."""
    from dzad.cli.model_options import load_model

    model = load_model(str(work / "ckpt"), False)
    before = _rss_mb()
    lap = stopwatch()
    if path == "score":
        from benchmarks.score import score_command

        folder = work / f"images_{n}"
        score_command(model, work / "ckpt", folder, work / f"out_score_{n}", batch=8)
    else:
        from dzad.evaluation import evaluate

        evaluate(model, work / f"mvtec_{n}", [CATEGORY], work / f"out_eval_{n}", model.cfg.evaluate)
    seconds = lap().wall
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_mb": peak, "before_mb": before, "seconds": seconds}


def run_child(path: str, n: int, work: Path, threads: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "benchmarks.memory", "--child", path, "--n", str(n)]
    cmd += ["--work", str(work), "--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {path} n={n} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare(work: Path, sizes: list[int], quick: bool) -> None:
    """Checkpoint, ``images_<n>`` folders (symlinks into one set of PNGs), ``mvtec_<n>`` roots."""
    cfg = demo_config(quick=quick)
    build_model(cfg, n_source=4 if quick else 16).save(work / "ckpt")
    pngs = write_pngs(work / "images", max(sizes), cfg.data.image_size)
    for n in sizes:
        link_images(pngs[:n], work / f"images_{n}")
        write_mvtec(work / f"mvtec_{n}", CATEGORY, n, cfg.data.image_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=1000)
    parser.add_argument("--paths", nargs="+", default=["score", "evaluate"])
    parser.add_argument("--child", choices=["score", "evaluate"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    add_common_args(parser)
    args = parser.parse_args()
    setup(args)
    if args.child:
        print(json.dumps(child(args.child, args.n, args.work)))
        return
    small, large = (8, 24) if args.quick else (args.small, args.large)
    figures: dict[str, object] = {"bench": "memory", "small": small, "large": large}
    with tempfile.TemporaryDirectory(prefix="dzad-bench-") as tmp:
        work = Path(tmp)
        prepare(work, [small, large], args.quick)
        for path in args.paths:
            runs = {n: run_child(path, n, work, args.threads) for n in (small, large)}
            suffix = "" if path == "score" else f"_{path}"
            figures[f"rss_ratio{suffix}"] = runs[large]["peak_mb"] / runs[small]["peak_mb"]
            for n, r in runs.items():
                figures[f"peak_rss_mb{suffix}_{n}"] = r["peak_mb"]
                figures[f"rss_growth_mb{suffix}_{n}"] = r["peak_mb"] - r["before_mb"]
            figures[f"images_per_s{suffix}"] = large / runs[large]["seconds"]
    emit(figures)


if __name__ == "__main__":
    main()
