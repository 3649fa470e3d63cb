"""DVC ``register`` stage: log a trained checkpoint and its evaluations, register, promote.

``python -m flows.register --params params.yaml --checkpoint models [--metrics
runs/eval/<target>/summary.json ...] [--eval-root runs/eval] [--out runs/register.json]``

``--checkpoint``: a checkpoint folder, or the models folder (``seed_<s>/``; seed ``cfg.seed`` is
registered). The metrics are the summaries over every seed, so promotion compares study means.

One MLflow run (``register``) gets the resolved params, provenance, the source manifests' hashes,
the checkpoint, and per ``--metrics`` file (a target's ``summary.json`` as ``dzad stage evaluate``
exports it) the metrics, AUROC tables and the figures of ``<eval-root>/<target>/seed_<s>/``. The
checkpoint is then registered (``candidate``) and promoted to ``champion`` when it is not worse
than the current champion (``tracking.tolerance``). A refusal is a result, not a failure: it is
printed and written to ``--out``; the exit code is non-zero only for errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dzad.errors import DZADError
from flows import telemetry_off


def manifest_hashes(cfg) -> dict[str, str]:
    """``{source_<i> | target: sha256 of manifest.csv}``; every SOURCE cache must exist."""
    from dzad.data.preprocess import MANIFEST
    from dzad.errors import DZADInputError
    from dzad.io_utils import sha256_file
    from dzad.study.layout import source_cache, source_refs, target_cache

    out = {}
    for i in range(len(source_refs(cfg))):
        path = source_cache(cfg, i) / MANIFEST
        if not path.is_file():
            raise DZADInputError(path, "no manifest: run the preprocess stage first")
        out[f"source_{i}"] = sha256_file(path)
    for target in cfg.sets.targets:
        path = target_cache(cfg, target) / MANIFEST
        if path.is_file():
            out[target] = sha256_file(path)
    return out


def _read_summary(path: Path) -> dict:
    from dzad.errors import DZADInputError

    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DZADInputError(path, f"unreadable metrics file: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("target"), str):
        raise DZADInputError(path, "not a target summary (no 'target' name)")
    return data


def run(
    params: Path,
    checkpoint: Path,
    metrics: Sequence[Path],
    eval_root: Path,
    out: Path | None = None,
    force: bool = False,
) -> dict:
    """The stage's work (module docstring); returns :func:`flows.tracking.promotion.promote`'s
    dict."""
    from dzad import config
    from dzad.study.layout import checkpoints
    from dzad.study.summaries import write_json
    from flows.tracking.promotion import promote
    from flows.tracking.registry import register
    from flows.tracking.results import log_evaluation
    from flows.tracking.runs import run_label, start_run
    from flows.tracking.training import log_training

    cfg = config.load(params)
    checkpoint = checkpoints(checkpoint, [cfg.seed])[cfg.seed]
    # Without --metrics: every target of the study, as `dzad stage evaluate` exported it.
    metrics = metrics or [eval_root / target / "summary.json" for target in cfg.sets.targets]
    summaries = [_read_summary(Path(m)) for m in metrics]
    name = run_label("register", cfg, f"seed{cfg.seed}")
    with start_run(cfg, name, tags={"dzad.stage": "register"}) as active:
        log_training(active, cfg, checkpoint, manifest_hashes(cfg))
        for summary in summaries:
            target = summary["target"]
            log_evaluation(active, target, summary, eval_root / target, cfg=cfg)
        version = register(checkpoint, active.info.run_id, cfg)
    result = promote(version, cfg, force=force)
    result["run_id"] = active.info.run_id
    if out is not None:
        write_json(out, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    telemetry_off()  # before run() imports MLflow
    parser = argparse.ArgumentParser(prog="python -m flows.register", description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint or models/")
    parser.add_argument(
        "--metrics",
        type=Path,
        action="append",
        default=[],
        help="target summary JSON (repeat); default: every target under --eval-root",
    )
    parser.add_argument("--eval-root", type=Path, default=Path("runs/eval"))
    parser.add_argument("--out", type=Path, default=None, help="write the decision here (JSON)")
    parser.add_argument("--force", action="store_true", help="promote even if it is worse")
    args = parser.parse_args(argv)
    try:
        result = run(
            args.params, args.checkpoint, args.metrics, args.eval_root, args.out, args.force
        )
    except (DZADError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"version {result['version']}: {result['decision']} ({result['reason']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
