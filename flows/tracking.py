"""Every MLflow call of DZAD: runs, parameters, metrics, artifacts, the model registry, promotion.

Store: ``TrackingConfig.tracking_uri`` (default ``sqlite:///mlflow.db``, relative to the working
directory) unless ``MLFLOW_TRACKING_URI`` names another one (a shared server). An experiment created
here keeps its artifacts under ``TrackingConfig.artifact_root`` (``mlartifacts/``) when the store is
local. Telemetry is off (``flows/__init__.py`` sets ``MLFLOW_DISABLE_TELEMETRY`` before the import).

Runs are passed around as an ``ActiveRun``, a ``Run`` or a run id, and every write goes through an
``MlflowClient`` with that explicit id, so Prefect tasks in worker threads can log to one run.

Names: training metrics ``train/<name>`` per step; evaluation metrics
``<target>/<category>/<metric>`` and ``<target>/mean/<metric>``. Registry: aliases, never stages --
``candidate`` is the newest registered version, ``champion`` the promoted one (:func:`promote`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from dzad.config import DZADConfig, TrackingConfig, flatten
from dzad.errors import DZADInputError
from dzad.io_utils import sha256_file

CANDIDATE, CHAMPION = "candidate", "champion"
MODEL_ARTIFACT = "model"  # name of the logged pyfunc model
CHECKPOINT_ARTIFACT = "checkpoint"  # the training run's artifact folder of the checkpoint
_BATCH = 100  # log_batch limit for params / tags


def tracking_uri(cfg: TrackingConfig) -> str:
    """The store to use: ``MLFLOW_TRACKING_URI`` wins over ``cfg.tracking_uri``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def _tcfg(cfg: DZADConfig | TrackingConfig) -> TrackingConfig:
    return cfg.tracking if isinstance(cfg, DZADConfig) else cfg


def client(cfg: DZADConfig | TrackingConfig | None = None) -> MlflowClient:
    """A client on the configured store, also made the fluent API's (runs, model logging).

    ``cfg`` None: the store the last call selected (the one the caller's run lives in).
    """
    if cfg is None:
        return MlflowClient(mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    uri = tracking_uri(_tcfg(cfg))
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():  # MLflow copies the URI into the environment: undo that,
        if value is None:  # or the next config's tracking_uri would lose to our own leftover
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(cfg: DZADConfig | TrackingConfig) -> str:
    """Id of ``cfg.experiment``; a new one keeps its artifacts in ``artifact_root/<experiment>``
    (local stores; a tracking server chooses its own artifact store)."""
    tc = _tcfg(cfg)
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


def run_id(run: Any) -> str:
    """Id of an ``ActiveRun`` / ``Run`` / id string."""
    return run if isinstance(run, str) else run.info.run_id


def _batched(items: Sequence[Any], n: int = _BATCH) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def log_params(run: Any, cfg: DZADConfig) -> None:
    """Every resolved parameter, flattened (``model.profile``, ``train.steps``, ...)."""
    c, rid = client(cfg), run_id(run)
    params = [Param(k, _param_value(v)) for k, v in sorted(flatten(cfg).items())]
    for chunk in _batched(params):
        c.log_batch(rid, params=list(chunk))


def set_tags(run: Any, cfg: DZADConfig | TrackingConfig | None, tags: Mapping[str, Any]) -> None:
    c, rid = client(cfg), run_id(run)
    for key, value in tags.items():
        c.set_tag(rid, key, str(value))


def log_metrics(
    run: Any, cfg: DZADConfig | TrackingConfig | None, metrics: Mapping[str, float], step: int = 0
) -> None:
    """Named scalars at ``step``, written in batches."""
    c, rid, ts = client(cfg), run_id(run), int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
    for chunk in _batched(items, 1000):
        c.log_batch(rid, metrics=list(chunk))


@dataclass
class TrainingLogger:
    """``dzad.training.train`` callback: per-step ``train/<metric>`` (loss, lr, images_per_s, ...).

    Steps are buffered and written every ``flush_every`` steps and at every checkpoint (the last one
    included), so the store sees one write per batch of steps, not per step.
    """

    client: MlflowClient
    run_id: str
    flush_every: int = 10
    buffer: list[Metric] = field(default_factory=list)

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        ts = int(time.time() * 1000)
        self.buffer += [Metric(f"train/{k}", float(v), ts, step) for k, v in metrics.items()]
        if step % max(1, self.flush_every) == 0:
            self.flush()

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.flush()
        self.client.set_tag(self.run_id, "dzad.checkpoint_step", str(step))
        self.client.set_tag(self.run_id, "dzad.checkpoint_path", str(path))

    def flush(self) -> None:
        for chunk in _batched(self.buffer, 1000):
            self.client.log_batch(self.run_id, metrics=list(chunk))
        self.buffer = []


def training_callbacks(run: Any, cfg: DZADConfig | TrackingConfig | None = None) -> list[Any]:
    """Callbacks for ``train(..., callbacks=...)`` that log the loss curve and images/s per step."""
    every = _tcfg(cfg).flush_every if cfg is not None else TrackingConfig.flush_every
    return [TrainingLogger(client(cfg), run_id(run), every)]


def log_checkpoint(run: Any, cfg: DZADConfig, ckpt_dir: Path) -> None:
    """The checkpoint folder as artifacts under ``checkpoint/`` (``train_state/`` only if asked)."""
    from dzad.checkpoint import TRAIN_STATE

    c, rid = client(cfg), run_id(run)
    for part in sorted(Path(ckpt_dir).iterdir()):
        if part.name == TRAIN_STATE and not cfg.tracking.log_train_state:
            continue
        if part.is_dir():
            c.log_artifacts(rid, str(part), f"{CHECKPOINT_ARTIFACT}/{part.name}")
        else:
            c.log_artifact(rid, str(part), CHECKPOINT_ARTIFACT)


def log_training(
    run: Any,
    cfg: DZADConfig,
    ckpt_dir: Path,
    manifest_hashes: Mapping[str, str],
    *,
    result: Any = None,
) -> None:
    """Params, provenance, dataset manifest hashes, the checkpoint and (``result``: TrainResult)
    its totals. Raises :class:`~dzad.errors.CheckpointError` for a folder that is no checkpoint."""
    from dzad.checkpoint import read_meta

    meta = read_meta(ckpt_dir)
    log_params(run, cfg)
    train = meta.get("train") or {}
    tags = {f"dzad.train.{k}": v for k, v in train.items()}
    tags.update({f"dzad.manifest.{name}": sha for name, sha in manifest_hashes.items()})
    set_tags(run, cfg, tags)
    client(cfg).log_dict(run_id(run), dict(manifest_hashes), "data/manifests.json")
    if result is not None:
        totals = {
            "train/seconds": result.seconds,
            "train/images_per_s_mean": result.images_per_second,
            "train/final_loss": result.losses[-1] if result.losses else math.nan,
        }
        log_metrics(run, cfg, totals, step=result.steps)
    log_checkpoint(run, cfg, ckpt_dir)


# --- evaluation ---------------------------------------------------------------------------------

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
    from dzad.study import seed_results

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
    scores, ROC figures and the heat-map gallery -- under ``evaluation/<target>/``.

    ``metrics``: ``study.evaluate_target``'s result with its ``eval_dir``, or a ``summary.json``
    with the folder holding its ``seed_<s>/`` evaluations.
    """
    from dzad.reports import auroc_table

    log_metrics(run, cfg, evaluation_metrics(target, metrics))
    seeds = _seed_results(metrics, Path(eval_dir))
    for metric in ("image_auroc", "pixel_auroc"):
        log_table(run, f"{target}/{metric}", auroc_table({"DZAD": seeds}, metric), cfg=cfg)
    c, rid, eval_dir = client(cfg), run_id(run), Path(eval_dir)
    for path in sorted(p for p in eval_dir.rglob("*") if p.is_file()):
        if path.suffix not in _NOT_LOGGED and not path.name.startswith("."):
            where = path.parent.relative_to(eval_dir).as_posix()
            c.log_artifact(rid, str(path), posixpath.join("evaluation", target, where).rstrip("/."))


# --- registry and promotion ---------------------------------------------------------------------


@contextlib.contextmanager
def _in_run(cfg: DZADConfig, rid: str | None) -> Iterator[str]:
    """Make run ``rid`` the fluent active run (model logging needs one), reusing it when it already
    is; ``rid`` None starts a new ``register`` run. Yields the run id."""
    active = mlflow.active_run()
    if rid is not None and active is not None and active.info.run_id == rid:
        yield rid
    elif rid is None:
        with start_run(cfg, "register", nested=active is not None) as run:
            yield run.info.run_id
    else:
        with mlflow.start_run(run_id=rid, nested=active is not None):
            yield rid


def _pip_requirements() -> list[str]:
    """The ``dzad`` distribution's own pinned dependencies (no slow inference subprocess)."""
    from importlib.metadata import requires

    return [r for r in requires("dzad") or [] if "extra ==" not in r]


def register(ckpt_dir: Path, run_id_: str | None, cfg: DZADConfig) -> ModelVersion:
    """Log the checkpoint as a pyfunc model in run ``run_id_`` (None: a new ``register`` run),
    register it as ``cfg.tracking.model_name`` and point ``candidate`` at the new version.

    The model (``flows/pyfunc.py``, logged as code: no pickle) carries the checkpoint without
    ``train_state/`` and the study's config (its inference settings apply, as in evaluation), a
    signature and an input example (a mid-grey image of the model's size) that MLflow runs through
    the model before anything is registered.
    """
    from dzad.checkpoint import TRAIN_STATE, read_meta
    from dzad.config import to_dict
    from flows import pyfunc

    meta = read_meta(ckpt_dir)
    size = int(meta["model"]["image_size"])
    c = client(cfg)
    with tempfile.TemporaryDirectory(prefix="dzad-register-") as tmp:
        staged = Path(tmp) / pyfunc.CHECKPOINT
        shutil.copytree(ckpt_dir, staged, ignore=shutil.ignore_patterns(TRAIN_STATE))
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(to_dict(cfg), indent=1))
        with _in_run(cfg, run_id_):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=pyfunc.__file__,
                artifacts={pyfunc.CHECKPOINT: str(staged), pyfunc.CONFIG: str(config)},
                signature=pyfunc.signature(),
                input_example=pyfunc.input_example(size),
                pip_requirements=_pip_requirements(),
                metadata={"dzad_version": meta.get("dzad_version"), "image_size": size},
            )
    name = cfg.tracking.model_name
    tags = {k: v for k, v in source_tags().items() if k.startswith("dzad.")}
    number = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
    c.set_registered_model_alias(name, CANDIDATE, number)
    return c.get_model_version(name, number)


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


def list_versions(cfg: DZADConfig | TrackingConfig) -> list[dict[str, Any]]:
    """Every version of the registered model, newest first, with its aliases and tags."""
    tc = _tcfg(cfg)
    c = client(tc)
    try:
        aliases = c.get_registered_model(tc.model_name).aliases
    except MlflowException:
        return []
    by_version: dict[str, list[str]] = {}
    for alias, number in aliases.items():
        by_version.setdefault(str(number), []).append(alias)
    rows = [
        {
            "version": str(mv.version),
            "aliases": sorted(by_version.get(str(mv.version), [])),
            "run_id": mv.run_id,
            "created": mv.creation_timestamp,
            "tags": dict(mv.tags),
        }
        for mv in c.search_model_versions(f"name = '{tc.model_name}'")
    ]
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


def resolve_model(uri: str, *, cfg: DZADConfig | TrackingConfig | None = None) -> Path:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> the local checkpoint folder.

    Works offline against the local SQLite store: a local artifact store is read in place (no
    copy); a remote one is downloaded to a temporary folder by MLflow.
    """
    from dzad.checkpoint import read_meta
    from flows.pyfunc import CHECKPOINT

    if not uri.startswith("models:/"):
        raise DZADInputError(uri, "not a registry URI (expected models:/<name>@<alias>)")
    client(cfg if cfg is not None else TrackingConfig())
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        flavor = mlflow.models.Model.load(str(local)).flavors["python_function"]
        relative = flavor["artifacts"][CHECKPOINT]["path"]
    except (MlflowException, KeyError, OSError) as exc:
        raise DZADInputError(uri, f"cannot resolve the registered model: {exc}") from None
    folder = local / relative
    read_meta(folder)  # a clear CheckpointError if the artifact is not a whole checkpoint
    return folder
