"""Promotion: ``champion`` moves to a registered version whose cross-dataset mean AUROCs are not
worse than the current champion's by more than ``tracking.tolerance``; the decision is recorded."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from dzad.config import DZADConfig
from flows.tracking.runs import client

CHAMPION = "champion"


def promotion_targets(cfg: DZADConfig) -> tuple[str, ...]:
    """Targets averaged for promotion: ``tracking.promotion_targets``, or else every target."""
    targets = cfg.tracking.promotion_targets or tuple(cfg.sets.targets)
    if not targets:
        raise ValueError("promotion needs targets: set tracking.promotion_targets or sets.targets")
    return targets


def cross_dataset_means(
    run_metrics: Mapping[str, float], targets: Sequence[str], metrics: Sequence[str]
) -> dict[str, float | None]:
    """``{metric: mean over targets of <target>/mean/<metric>}``; None when a target lacks it."""
    out: dict[str, float | None] = {}
    for metric in metrics:
        values = [run_metrics.get(f"{t}/mean/{metric}") for t in targets]
        ok = all(v is not None and math.isfinite(v) for v in values)
        out[metric] = sum(values) / len(values) if ok else None  # type: ignore[arg-type]
    return out


def decide(
    candidate: Mapping[str, float | None],
    champion: Mapping[str, float | None] | None,
    tolerance: float,
) -> tuple[bool, str]:
    """Promote unless a metric falls more than ``tolerance`` below the champion's or is missing."""
    missing = [m for m, v in candidate.items() if v is None]
    if champion is None:
        if missing:
            return False, f"candidate lacks {missing}"
        return True, "no champion yet"
    worse = []
    for metric, champ in champion.items():
        if champ is None:
            continue  # the champion never had this metric: nothing to defend
        cand = candidate.get(metric)
        if cand is None:
            worse.append(f"{metric} missing (champion {champ:.4f})")
        elif cand < champ - tolerance:
            worse.append(f"{metric} {cand:.4f} < champion {champ:.4f} - {tolerance}")
    if worse:
        return False, "; ".join(worse)
    return True, f"not worse than the champion by more than {tolerance}"


def run_metrics_with_siblings(c: MlflowClient, rid: str) -> dict[str, float]:
    """Metrics of run ``rid``, completed by its sibling runs' (same parent run), newest winning.

    A Prefect flow run logs the training (where the model is registered) and each target's
    evaluation as sibling nested runs; DVC's register stage logs everything in one run.
    """
    run = c.get_run(rid)
    metrics: dict[str, float] = {}
    parent = run.data.tags.get("mlflow.parentRunId")
    if parent:
        siblings = c.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent}'",
            order_by=["attributes.start_time ASC"],
        )
        for sibling in siblings:
            metrics.update(sibling.data.metrics)
    metrics.update(run.data.metrics)
    return metrics


def _version_means(
    c: MlflowClient, version: ModelVersion, cfg: DZADConfig
) -> dict[str, float | None]:
    if not version.run_id:
        raise ValueError(f"model version {version.version} has no source run to read metrics from")
    metrics = run_metrics_with_siblings(c, version.run_id)
    return cross_dataset_means(metrics, promotion_targets(cfg), cfg.tracking.promotion_metrics)


def _alias_version(c: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.6f}"


def promote(version: ModelVersion | str | int, cfg: DZADConfig, *, force: bool = False) -> dict:
    """Move ``champion`` to ``version`` if its cross-dataset mean AUROCs are not worse than the
    current champion's by more than ``tracking.tolerance`` (or ``force``); record it as tags.

    Returns ``{"version", "promoted", "decision", "reason", "candidate", "champion",
    "champion_version", "targets", "tolerance"}``; ``decision`` is promoted / refused / forced.
    """
    tc = cfg.tracking
    c = client(cfg)
    number = str(version.version if isinstance(version, ModelVersion) else version)
    try:
        mv = c.get_model_version(tc.model_name, number)
    except MlflowException as exc:
        raise ValueError(f"model {tc.model_name!r} has no version {number}") from exc
    current = _alias_version(c, tc.model_name, CHAMPION)
    current_number = str(current.version) if current is not None else None
    cand = _version_means(c, mv, cfg)
    champ = None
    if current is not None and current_number != number:
        champ = _version_means(c, current, cfg)
    ok, reason = decide(cand, champ, tc.tolerance)
    if current_number == number:
        ok, reason = True, "already the champion"
    decision = "promoted" if ok else ("forced" if force else "refused")
    tags = {
        "dzad.promotion.decision": decision,
        "dzad.promotion.reason": reason,
        "dzad.promotion.tolerance": str(tc.tolerance),
        "dzad.promotion.targets": ",".join(promotion_targets(cfg)),
        "dzad.promotion.champion_version": current_number or "none",
    }
    for metric in tc.promotion_metrics:
        tags[f"dzad.promotion.{metric}"] = _fmt(cand[metric])
        tags[f"dzad.promotion.champion_{metric}"] = _fmt((champ or {}).get(metric))
    for key, value in tags.items():
        c.set_model_version_tag(tc.model_name, number, key, value)
    if decision != "refused":
        c.set_registered_model_alias(tc.model_name, CHAMPION, number)
    return {
        "version": number,
        "promoted": decision != "refused",
        "decision": decision,
        "reason": reason,
        "candidate": cand,
        "champion": champ,
        "champion_version": current_number,
        "targets": list(promotion_targets(cfg)),
        "tolerance": tc.tolerance,
    }
