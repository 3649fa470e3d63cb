"""The MLflow store and its runs: client, experiment, provenance tags, parameters, tags, metrics."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from dzad.config import DZADConfig, TrackingConfig, flatten
from dzad.errors import DZADError, DZADInputError
from dzad.io_utils import sha256_file

_BATCH = 100  # log_batch limit for params / tags


def tracking_uri(cfg: TrackingConfig) -> str:
    """The store to use: ``MLFLOW_TRACKING_URI`` wins over ``cfg.tracking_uri``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def tracking_config(cfg: DZADConfig | TrackingConfig) -> TrackingConfig:
    """The ``tracking`` section of a study config (a ``TrackingConfig`` as it is)."""
    return cfg.tracking if isinstance(cfg, DZADConfig) else cfg


def client(cfg: DZADConfig | TrackingConfig | None = None) -> MlflowClient:
    """A client on the configured store, also made the fluent API's (runs, model logging).

    ``cfg`` None: the store the last call selected (the one the caller's run lives in).
    """
    if cfg is None:
        return MlflowClient(mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    uri = tracking_uri(tracking_config(cfg))
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():  # MLflow copies the URI into the environment: undo that,
        if value is None:  # or the next config's tracking_uri would lose to our own leftover
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def store_path(uri: str) -> Path | None:
    """The local file or folder behind a SQLite / file store URI; None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:"):
        return Path(urllib.parse.urlparse(uri).path)
    return None if "://" in uri or uri.startswith("databricks") else Path(uri)


def missing(exc: MlflowException) -> bool:
    """Whether ``exc`` says the thing looked up does not exist (not that the store failed)."""
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def require_store(cfg: DZADConfig | TrackingConfig, timeout: float = 5.0) -> str:
    """For look-ups (registry, promotion, listing): the configured store must exist or answer.

    A local store that does not exist is an error (MLflow would create an empty ``mlflow.db`` in
    the working directory); a server that does not answer ``/health`` within ``timeout`` seconds
    is an error naming it (MLflow itself would retry for minutes). Returns the store URI.
    """
    uri = tracking_uri(tracking_config(cfg))
    path = store_path(uri)
    if path is not None and not path.exists():
        raise DZADInputError(
            path, f"no tracking store here ({uri}): nothing registered yet, or set the right store"
        )
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # the server answered: it is up
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DZADError(
                f"tracking server {uri} is unreachable ({reason}); check MLFLOW_TRACKING_URI"
            ) from None
    return uri


def experiment_id(cfg: DZADConfig | TrackingConfig) -> str:
    """Id of ``cfg.experiment``; a new one keeps its artifacts in ``artifact_root/<experiment>``
    (local stores; a tracking server chooses its own artifact store)."""
    tc = tracking_config(cfg)
    c = client(tc)
    exp = c.get_experiment_by_name(tc.experiment)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    remote = tracking_uri(tc).startswith(("http://", "https://", "databricks"))
    location = None if remote else (Path(tc.artifact_root) / tc.experiment).resolve().as_uri()
    try:
        return c.create_experiment(tc.experiment, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        exp = c.get_experiment_by_name(tc.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_tags(root: Path | None = None) -> dict[str, str]:
    """Provenance of the working directory: git commit (+ dirty flag) and ``dvc.lock``'s sha256.

    A tag is left out, not faked, when its source does not exist (no git work tree, no dvc.lock).
    """
    from dzad import __version__

    root = Path.cwd() if root is None else root
    tags = {"dzad.version": __version__}
    commit = _git("-C", str(root), "rev-parse", "HEAD")
    if commit:
        status = _git("-C", str(root), "status", "--porcelain", "--untracked-files=no")
        tags.update({"mlflow.source.git.commit": commit, "dzad.git_commit": commit})
        tags["dzad.git_dirty"] = str(bool(status)).lower()
    lock = root / "dvc.lock"
    if lock.is_file():
        tags["dzad.dvc_lock_sha256"] = sha256_file(lock)
    return tags


def start_run(
    cfg: DZADConfig | TrackingConfig,
    name: str,
    *,
    nested: bool = False,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> mlflow.ActiveRun:
    """Start (``with start_run(...) as run:``) a run in ``cfg.experiment`` with provenance tags."""
    exp = experiment_id(cfg)
    return mlflow.start_run(
        experiment_id=exp,
        run_name=name,
        nested=nested,
        parent_run_id=parent_run_id,
        tags={**source_tags(), **(tags or {})},
    )


def run_label(stage: str, cfg: DZADConfig, *parts: object) -> str:
    """MLflow run name that tells runs apart: ``<stage>-<study>-<parts...>``, e.g.
    ``evaluate-tiny-objects-seed0`` or ``register-demo-seed0``."""
    return "-".join(str(p) for p in (stage, cfg.study, *parts))


def run_id(run: Any) -> str:
    """Id of an ``ActiveRun`` / ``Run`` / id string."""
    return run if isinstance(run, str) else run.info.run_id


def batched(items: Sequence[Any], n: int = _BATCH) -> Iterator[Sequence[Any]]:
    """``items`` in chunks of at most ``n`` (the store's batch limits)."""
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def log_params(run: Any, cfg: DZADConfig) -> None:
    """Every resolved parameter, flattened (``model.profile``, ``train.steps``, ...)."""
    c, rid = client(cfg), run_id(run)
    params = [Param(k, _param_value(v)) for k, v in sorted(flatten(cfg).items())]
    for chunk in batched(params):
        c.log_batch(rid, params=list(chunk))


def set_tags(run: Any, cfg: DZADConfig | TrackingConfig | None, tags: Mapping[str, Any]) -> None:
    """Tags as strings, written in batches (one call per :data:`_BATCH`, not one per tag)."""
    c, rid = client(cfg), run_id(run)
    items = [RunTag(k, str(v)) for k, v in tags.items()]
    for chunk in batched(items):
        c.log_batch(rid, tags=list(chunk))


def log_metrics(
    run: Any, cfg: DZADConfig | TrackingConfig | None, metrics: Mapping[str, float], step: int = 0
) -> None:
    """Named scalars at ``step``, written in batches."""
    c, rid, ts = client(cfg), run_id(run), int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
    for chunk in batched(items, 1000):
        c.log_batch(rid, metrics=list(chunk))
