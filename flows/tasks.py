"""Prefect tasks of the DZAD flows: :mod:`dzad.study` does the work, :mod:`flows.tracking` logs it.

I/O tasks retry on ``OSError`` only (:data:`IO_RETRIES`); the tasks that run a model are cached
(:data:`CACHED`, policy :data:`EXPENSIVE`) and log to a nested MLflow run under the flow run's
parent run. :mod:`flows.pipeline` describes retries, caching and runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.states import State

import dzad as dzad_package
from dzad.config import DZADConfig, flatten
from dzad.io_utils import sha256_file
from dzad.study.ablations import ablate
from dzad.study.data import prepare_data, preprocess_data
from dzad.study.layout import checkpoints, with_seed
from dzad.study.seed_evaluation import evaluate_target
from dzad.study.seed_regimes import evaluate_regimes
from dzad.study.seed_training import train_launched
from dzad.study.summaries import KEY_METRICS, jsonable
from flows.tracking import registry
from flows.tracking.results import log_evaluation, log_table
from flows.tracking.runs import log_metrics, run_label, set_tags, start_run
from flows.tracking.training import log_training, training_callbacks

Models = dict[int, dict[str, str | None]]  # seed -> checkpoint, fingerprint, MLflow run id


# ----------------------------------------------------------------------- retries and caching
def _transient(task: Any, task_run: Any, state: State) -> bool:
    """Retry what can heal (network, disk: ``OSError``), never a bad input or a bug."""
    return isinstance(state.result(raise_on_failure=False), OSError)


@functools.cache
def code_version() -> str:
    """sha256 of the ``dzad`` library's sources (the command line excluded): a library change
    invalidates cached results, as a changed code dependency reruns a DVC stage."""
    root = Path(dzad_package.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] != "cli" and rel.name != "__main__.py":
            h.update(rel.as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _code_key(context: Any, parameters: dict[str, Any]) -> str:
    return code_version()


# What training reads (training, then the source-only calibration, which scores with the map
# settings): flattened config keys by prefix. The targets, the ablation and tracking are not read.
TRAINING_READS = (
    "seed",
    "data.",
    "model.",
    "train.",
    "noise.",
    "weighting.",
    "detection.",
    "reconstruction.",
    "anomaly_map.",
    "evaluate.batch_size",
    "sets.source",
)


def training_inputs(cfg: DZADConfig) -> dict[str, Any]:
    """The settings training reads (:data:`TRAINING_READS`), flattened."""
    flat = flatten(cfg)
    return {
        k: v
        for k, v in flat.items()
        if k in TRAINING_READS or k[: k.find(".") + 1] in TRAINING_READS
    }


def _training_key(context: Any, parameters: dict[str, Any]) -> str:
    text = json.dumps(training_inputs(parameters["cfg"]), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# The parent MLflow run differs per flow run and resuming yields the same checkpoint: neither
# may defeat the cache.
EXPENSIVE = (
    (INPUTS - "parent_run_id" - "resume") + TASK_SOURCE + CachePolicy.from_cache_key_fn(_code_key)
)
# Training is keyed on what it reads only: another target list reuses the checkpoint.
TRAINING = (
    (INPUTS - "cfg" - "parent_run_id" - "resume")
    + TASK_SOURCE
    + CachePolicy.from_cache_key_fn(_code_key)
    + CachePolicy.from_cache_key_fn(_training_key)
)
# Tasks that run a model carry MODEL_TAG: `prefect concurrency-limit create dzad-model 1` keeps
# them to one at a time on a small GPU.
MODEL_TAG = "dzad-model"
CACHED = {"cache_policy": EXPENSIVE, "persist_result": True, "tags": [MODEL_TAG]}
IO_RETRIES = {"retries": 3, "retry_delay_seconds": [5, 30, 120], "retry_condition_fn": _transient}


# ------------------------------------------------------------------------------------- tasks
@task(name="prepare-data", **IO_RETRIES)
def prepare_task(cfg: DZADConfig, raw_dir: Path) -> dict[str, Path]:
    """Synthesise, download + convert (resumable) or check every dataset root; the record of the
    roots (``datasets.json``) goes to ``raw_dir`` (the flow's own, never DVC's ``data/raw``)."""
    return prepare_data(cfg, raw_dir=raw_dir)


@task(name="preprocess-data")
def preprocess_task(cfg: DZADConfig) -> dict[str, str]:
    """Resized caches (unchanged ones are kept); returns ``{name: manifest sha256}``."""
    from dzad.data.preprocess import MANIFEST

    roots = preprocess_data(cfg)
    return {name: sha256_file(root / MANIFEST) for name, root in roots.items()}


def _model(ckpt: Path, run_id: str | None) -> dict[str, str | None]:
    fingerprint = sha256_file(Path(ckpt) / "dzad.json")
    return {"checkpoint": str(ckpt), "fingerprint": fingerprint, "run_id": run_id}


@task(name="resolve-model", **IO_RETRIES)
def resolve_task(cfg: DZADConfig, checkpoint: str) -> Models:
    """A checkpoint, a models folder (``seed_<s>/``) or a registry URI -> ``{seed: model}``."""
    if checkpoint.startswith("models:/"):
        return {cfg.seeds[0]: _model(registry.resolve_model(checkpoint, cfg=cfg), None)}
    return {s: _model(p, None) for s, p in checkpoints(checkpoint, cfg.seeds).items()}


@task(name="train", task_run_name="train-seed{seed}", **{**CACHED, "cache_policy": TRAINING})
def train_task(
    cfg: DZADConfig,
    ckpt_dir: Path,
    seed: int,
    manifests: dict[str, str],
    device: str,
    resume: bool,
    parent_run_id: str,
) -> dict[str, str | None]:
    """eq. 8 training + source-only calibration on ``device`` (``auto``, ``cpu``, ``cuda:0``...);
    ``resume`` continues the checkpoint a crashed run left in ``ckpt_dir`` (same config only).
    ``train.processes`` > 1 launches them with ``accelerate launch`` (:mod:`dzad.launch`; only
    the totals reach MLflow then, not the per-step metrics)."""
    name = run_label("train", cfg, f"seed{seed}")
    seeded = with_seed(cfg, seed)
    with start_run(cfg, name, nested=True, parent_run_id=parent_run_id) as run:
        result = train_launched(
            seeded,
            ckpt_dir,
            resume=resume,
            callbacks=training_callbacks(run, cfg),
            device=device,
        )
        log_training(run, seeded, result.checkpoint, manifests, result=result)
    return _model(result.checkpoint, run.info.run_id)


@task(name="register-model", **IO_RETRIES)
def register_task(cfg: DZADConfig, model: dict[str, str | None]) -> str:
    """Register a checkpoint as the ``candidate`` version of ``tracking.model_name``."""
    return str(registry.register(Path(model["checkpoint"]), model["run_id"], cfg).version)


@task(name="evaluate", task_run_name="evaluate-{target}-seed{seed}", **CACHED)
def evaluate_task(
    cfg: DZADConfig,
    model: dict[str, str | None],
    target: str,
    seed: int,
    eval_dir: Path,
    parent_run_id: str,
) -> dict[str, Any]:
    """The paper's protocol on one target with one seed's checkpoint; stores F for Table 4."""
    cfg = with_seed(cfg, seed)
    name = run_label("evaluate", cfg, target, f"seed{seed}")
    with start_run(cfg, name, nested=True, parent_run_id=parent_run_id) as run:
        metrics = evaluate_target(Path(model["checkpoint"]), cfg, target, eval_dir)
        log_evaluation(run, target, metrics, eval_dir, cfg=cfg)
    return {"target": target, "seed": seed, "fingerprint": sha256_file(eval_dir / "metrics.json")}


def models_folder(models: Models) -> Path:
    """What :func:`dzad.study.layout.checkpoints` reads back as ``models``: the one checkpoint, or
    the folder holding the seeds' ``seed_<s>/`` checkpoints."""
    ckpts = [Path(m["checkpoint"]) for m in models.values()]
    return ckpts[0] if len(ckpts) == 1 else ckpts[0].parent


@task(name="regimes", task_run_name="regimes-{target}", **CACHED)
def regimes_task(cfg: DZADConfig, models: Models, target: str, regime_dir: Path) -> dict[str, Any]:
    """Batch zero-shot and few-shot K on one target for every seed's checkpoint (the DVC
    ``regimes`` stage's function: one task per target, so the seeds share the backbone grids);
    ``models`` carries the fingerprints, so a retrained model invalidates the cached result.
    Returns ``{"target", "summaries": {regime dir: summary}}`` as the ``summary.json`` files hold
    them (undefined -> None)."""
    summaries = evaluate_regimes(cfg, models_folder(models), target, regime_dir)
    return {"target": target, "summaries": jsonable(summaries)}


def ablation_arms(cfg: DZADConfig) -> list[dict[str, Any]]:
    """Table 4 weight functions, Figure 4 ``t_start`` settings, Table 3 (when asked)."""
    a = cfg.ablation
    arms = [{"kind": "weighting", "value": w} for w in a.weightings]
    arms += [{"kind": "timesteps", "value": int(t)} for t in a.t_starts]
    return arms + ([{"kind": "architecture", "value": "table3"}] if a.architecture else [])


def arm_config(cfg: DZADConfig, arm: dict[str, Any]) -> DZADConfig:
    """``cfg`` whose ablation section holds this one arm."""
    kind, value = arm["kind"], arm["value"]
    abl = replace(
        cfg.ablation,
        weightings=(value,) if kind == "weighting" else (),
        t_starts=(value,) if kind == "timesteps" else (),
        architecture=kind == "architecture",
    )
    return replace(cfg, ablation=abl)


def _arm_metrics(frame: pd.DataFrame) -> dict[str, float]:
    """``<target>/<metric>``: mean over seeds of the arm's macro means (undefined ones left out)."""
    means = frame.groupby("target")[list(KEY_METRICS)].mean()
    return {
        f"{t}/{m}": float(v)
        for t, row in means.iterrows()
        for m, v in row.items()
        if not math.isnan(v)
    }


@task(name="ablation-arm", task_run_name="arm-{arm[kind]}={arm[value]}", **CACHED)
def arm_task(
    cfg: DZADConfig,
    arm: dict[str, Any],
    models_dir: Path,
    eval_dirs: dict[str, Path],
    upstream: list[str],
    arm_dir: Path,
    parent_run_id: str,
) -> list[dict[str, Any]]:
    """One arm: weight functions rescore the stored F (no model run); ``t_start`` reruns the
    evaluation; Table 3 trains its SD model. ``upstream``: fingerprints of models and evaluations
    (a retrained model or a new evaluation invalidates the cached arm)."""
    name = run_label("arm", cfg, f"{arm['kind']}={arm['value']}")
    with start_run(cfg, name, nested=True, parent_run_id=parent_run_id) as run:
        set_tags(run, cfg, {"dzad.ablation": arm["kind"], "dzad.setting": arm["value"]})
        frame = ablate(arm_config(cfg, arm), models_dir, eval_dirs, arm_dir)
        log_metrics(run, cfg, _arm_metrics(frame))
        log_table(run, "ablation", frame, cfg=cfg)
    return frame.to_dict("records")
