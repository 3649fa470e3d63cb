"""Promotion: ``champion`` moves to a registered version whose cross-dataset mean AUROCs are not
worse than the current champion's by more than ``tracking.tolerance``; the decision is recorded.

Read-compare-move runs under a file lock (:func:`promotion_lock`), so concurrent promotions cannot
both win against the same old champion and leave the worse version in place."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from dzad.config import DZADConfig
from dzad.errors import DZADError
from flows.tracking.runs import client, require_store, store_path

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
    """The version ``alias`` points at; None when unset (a store failure raises)."""
    number = c.get_registered_model(name).aliases.get(alias)
    return None if number is None else c.get_model_version(name, str(number))


def _lock_path(uri: str) -> Path:
    """Lock file of promotions on store ``uri``: beside a local store; for a server, one per
    server URI in the temp folder (it serialises the promotions started on this machine)."""
    local = store_path(uri)
    if local is not None:
        return local.with_name(f"{local.name}.promote.lock")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"dzad-promote-{digest}.lock"


@contextlib.contextmanager
def promotion_lock(uri: str, wait_s: float = 120.0) -> Iterator[None]:
    """Exclusive lock around read-champion / decide / move-alias, so that two promotions started
    together run one after the other and the second compares with the first's outcome (a
    compare-and-set); waits up to ``wait_s`` seconds for another promotion, then fails."""
    path = _lock_path(uri)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DZADError(
                        f"another promotion on {uri} holds {path} for over {wait_s:.0f} s"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.6f}"


def promote(version: ModelVersion | str | int, cfg: DZADConfig, *, force: bool = False) -> dict:
    """Move ``champion`` to ``version`` if its cross-dataset mean AUROCs are not worse than the
    current champion's by more than ``tracking.tolerance`` (or ``force``); record it as tags.

    Returns ``{"version", "promoted", "decision", "reason", "candidate", "champion",
    "champion_version", "targets", "tolerance"}``; ``decision`` is promoted / refused / forced.
    """
    uri = require_store(cfg)  # a dead server fails in seconds, naming it
    with promotion_lock(uri):
        return _promote(version, cfg, force)


def _promote(version: ModelVersion | str | int, cfg: DZADConfig, force: bool) -> dict:
    tc = cfg.tracking
    c = client(cfg)
    number = str(version.version if isinstance(version, ModelVersion) else version)
    try:
        mv = c.get_model_version(tc.model_name, number)
    except MlflowException as exc:  # the store answered (require_store): the version is unknown
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
