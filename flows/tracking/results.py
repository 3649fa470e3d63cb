"""Evaluation results in a run: metric names, AUROC tables (CSV + Markdown), the files of an
evaluation folder as artifacts and the scoring regimes' metrics and table."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from dzad.config import DZADConfig, TrackingConfig
from flows.tracking.runs import client, log_metrics, run_id

_NOT_LOGGED = frozenset({".npz", ".npy", ".tmp"})  # F matrices and raw maps stay DVC outputs
_BAD_CHARS = re.compile(r"[^/\w.\- ]")


def _name(*parts: str) -> str:
    """A portable MLflow metric name (letters, digits, ``_ . - /`` and spaces)."""
    return _BAD_CHARS.sub("_", "/".join(parts))


def _numbers(prefix: tuple[str, ...], block: Mapping[str, Any]) -> dict[str, float]:
    """``{<prefix>/<cat>/<metric>: v}`` of a ``{"categories": ..., "mean": ...}`` block."""
    rows = {**block.get("categories", {}), "mean": block.get("mean", {})}
    return {
        _name(*prefix, row, metric): float(v)
        for row, values in rows.items()
        for metric, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def evaluation_metrics(target: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """MLflow names of a ``metrics.json`` (one seed) or a ``summary.json`` (mean over seeds).

    ``<target>/<category>/<metric>`` and ``<target>/mean/<metric>`` for DZAD (summary: the means
    over seeds, plus ``<target>/mean/<metric>_std``); score variants under
    ``<target>/variants/<name>/...`` and controls under ``<target>/controls/<name>/...``.
    """
    if "seeds" not in metrics:  # one seed's metrics.json
        out = _numbers((target,), metrics)
        for kind in ("variants", "controls"):
            for name, block in (metrics.get(kind) or {}).items():
                out.update(_numbers((target, kind, name), block))
        return out
    out = _numbers((target,), {"categories": metrics.get("categories", {})})
    blocks = {(): metrics.get("dzad", {})}
    blocks.update({("controls", n): b for n, b in (metrics.get("controls") or {}).items()})
    blocks.update({("variants", k[5:]): b for k, b in metrics.items() if k.startswith("dzad_")})
    for where, block in blocks.items():
        for metric, stats in block.items():
            for stat, suffix in (("mean", ""), ("std", "_std")):
                if stats.get(stat) is not None:
                    out[_name(target, *where, "mean", metric + suffix)] = float(stats[stat])
    return out


def log_table(
    run: Any, name: str, table: Any, *, cfg: DZADConfig | TrackingConfig | None = None
) -> None:
    """``tables/<name>.csv`` and ``tables/<name>.md``: a ``dzad.reports.Table`` (paper layout,
    mean ± std cells) or a ``pandas.DataFrame`` (index kept when it is not a plain range)."""
    c, rid = client(cfg), run_id(run)
    if isinstance(table, pd.DataFrame):
        index = not isinstance(table.index, pd.RangeIndex)
        csv, md = table.to_csv(index=index), table.to_markdown(index=index) + "\n"
    else:
        csv, md = table.to_csv(), table.to_markdown()
    folder, stem = posixpath.split(f"tables/{name}")
    c.log_text(rid, csv, f"{folder}/{stem}.csv")
    c.log_text(rid, md, f"{folder}/{stem}.md")


def _seed_results(metrics: Mapping[str, Any], eval_dir: Path) -> list[Mapping[str, Any]]:
    """Per-seed ``metrics.json`` contents behind ``metrics`` (itself, or a summary's seeds)."""
    if "seeds" not in metrics:
        return [metrics]
    from dzad.study.seed_evaluation import seed_results

    return list(seed_results(eval_dir).values())


def log_evaluation(
    run: Any,
    target: str,
    metrics: Mapping[str, Any],
    eval_dir: Path,
    *,
    cfg: DZADConfig | TrackingConfig | None = None,
) -> None:
    """Metrics (:func:`evaluation_metrics`), the AUROC tables of the paper's layout (image and
    pixel AUROC, controls beside DZAD, mean ± std over seeds) and ``eval_dir``'s files -- metrics,
    scores, ROC and PR figures and the heat-map gallery -- under ``evaluation/<target>/``.

    ``metrics``: ``dzad.study.seed_evaluation.evaluate_target``'s result with its ``eval_dir``, or a
    ``summary.json`` with the folder holding its ``seed_<s>/`` evaluations.
    """
    from dzad.reports import auroc_table

    eval_dir = Path(eval_dir)
    log_metrics(run, cfg, evaluation_metrics(target, metrics))
    seeds = _seed_results(metrics, eval_dir)
    for metric in ("image_auroc", "pixel_auroc"):
        log_table(run, f"{target}/{metric}", auroc_table({"DZAD": seeds}, metric), cfg=cfg)
    c, rid = client(cfg), run_id(run)
    for path in sorted(p for p in eval_dir.rglob("*") if p.is_file()):
        if path.suffix not in _NOT_LOGGED and not path.name.startswith("."):
            where = path.parent.relative_to(eval_dir).as_posix()
            c.log_artifact(rid, str(path), posixpath.join("evaluation", target, where).rstrip("/."))


def regime_metrics(target: str, summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """:func:`evaluation_metrics` of each regime's ``summary.json`` (``{regime dir: summary}``, as
    ``dzad.study.seed_regimes.evaluate_regimes`` writes them) under ``regimes/<target>/<regime>/``:
    ``regimes/mesh/few_shot/mean/pixel_auroc``, ``regimes/mesh/few_shot/controls/<name>/...``."""
    out: dict[str, float] = {}
    for name, summary in summaries.items():
        out.update(evaluation_metrics(_name("regimes", target, name), summary))
    return out


def log_regimes(
    run: Any,
    summaries: Mapping[str, Mapping[str, Mapping[str, Any]]],
    table: Any,
    *,
    cfg: DZADConfig | TrackingConfig | None = None,
) -> None:
    """:func:`regime_metrics` of every target (``summaries``: ``{target: {regime dir: summary}}``)
    and ``tables/regimes.csv|md`` (``table``: ``reports/regimes.md``'s,
    :func:`dzad.study.report_folder.regimes_table`)."""
    metrics: dict[str, float] = {}
    for target, by_regime in summaries.items():
        metrics.update(regime_metrics(target, by_regime))
    log_metrics(run, cfg, metrics)
    log_table(run, "regimes", table, cfg=cfg)
