"""Prefect flows of DZAD: the orchestrator flow ``dzad`` and its stage subflows.

``dzad(stage=...)`` runs one study as far as ``stage``: ``train`` (prepare + preprocess the data,
train every seed), ``evaluate`` (+ every target) or ``ablation`` (+ the ablation arms as mapped
tasks, collected into one AUROC table). The three deployments of ``flows/serve.py`` differ only in
that default. Tasks call :mod:`dzad.study` (the implementation the CLI and the DVC stages share)
and :mod:`flows.tracking` (every MLflow call); this module only orchestrates.

- Parameters: ``params_file`` is parsed once per file content (:func:`dzad.config.load`); the other
  parameters override it (None keeps the file's value).
- Retries: only on I/O tasks (downloads, registry) and only for ``OSError`` (network, disk).
- Caching: training, evaluation and ablation arms are cached on their inputs (resolved config,
  paths, upstream fingerprints), the task's source and the ``dzad`` code version; results persist in
  ``<out_dir>/<study>/.prefect-results``, so a re-run after a crash reuses what finished. A cached
  result is trusted only while the files it wrote still exist.
- MLflow: one parent run per flow run (same name); training, evaluation and every ablation arm are
  nested runs; the collected ablation table is an artifact of the parent.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.runtime import flow_run
from prefect.states import State

import dzad as dzad_package
from dzad import config as dzad_config
from dzad.config import DZADConfig
from dzad.io_utils import atomic_write_text, sha256_file
from dzad.study.ablations import ablate
from dzad.study.data import prepare_data, preprocess_data
from dzad.study.evaluations import evaluate_target
from dzad.study.layout import checkpoints, seed_dir, with_seed
from dzad.study.models import train_model
from dzad.study.summaries import KEY_METRICS
from flows.tracking import registry
from flows.tracking.results import log_evaluation, log_table
from flows.tracking.runs import log_metrics, log_params, set_tags, start_run
from flows.tracking.training import log_training, training_callbacks

Stage = Literal["train", "evaluate", "ablation"]
STAGES: tuple[Stage, ...] = ("train", "evaluate", "ablation")
RESULTS_DIR = ".prefect-results"
ABLATION_TABLE = "ablation_auroc"
Models = dict[int, dict[str, str | None]]  # seed -> checkpoint, fingerprint, MLflow run id


# -------------------------------------------------------------------------------- parameters
@functools.lru_cache(maxsize=16)
def _parse(path: str, digest: str) -> DZADConfig:
    return dzad_config.load(path)  # its errors name the file


def load_params(params_file: str | Path) -> DZADConfig:
    """The params YAML as a config, parsed once per (path, content)."""
    path = Path(params_file)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
    return _parse(str(path), digest)


def apply_overrides(
    cfg: DZADConfig,
    *,
    seed: int | None = None,
    profile: str | None = None,
    steps: int | None = None,
    device: str | None = None,
    targets: list[str] | None = None,
    weightings: list[str] | None = None,
    t_starts: list[int] | None = None,
    architecture: bool | None = None,
) -> DZADConfig:
    """``cfg`` with the flow's ``-p key=value`` overrides (``seed``: a one-seed study)."""
    if seed is not None:
        cfg = replace(cfg, seed=seed, seeds=(seed,))
    model = cfg.model if profile is None else replace(cfg.model, profile=profile)
    train = cfg.train if steps is None else replace(cfg.train, steps=steps)
    train = train if device is None else replace(train, device=device)
    sets = cfg.sets
    if targets is not None:
        unknown = sorted(set(targets) - set(sets.targets))
        if unknown:
            raise ValueError(f"targets {unknown} are not in sets.targets {sorted(sets.targets)}")
        sets = replace(sets, targets={t: sets.targets[t] for t in targets})
    abl = cfg.ablation
    if weightings is not None:
        abl = replace(abl, weightings=tuple(weightings))
    if t_starts is not None:
        abl = replace(abl, t_starts=tuple(t_starts))
    if architecture is not None:
        abl = replace(abl, architecture=architecture)
    return replace(cfg, model=model, train=train, sets=sets, ablation=abl)


OVERRIDES = (
    "seed",
    "profile",
    "steps",
    "device",
    "targets",
    "weightings",
    "t_starts",
    "architecture",
)


def run_name(stage: str, cfg: DZADConfig) -> str:
    """``ablation-demo-seed0`` (``-seeds0-1-2`` for several): flow-run and MLflow run name."""
    seeds = "-".join(str(s) for s in cfg.seeds)
    return f"{stage}-{cfg.study}-seed{'s' if len(cfg.seeds) > 1 else ''}{seeds}"


def _flow_run_name() -> str:
    """The orchestrator's run name; a bad params file still gets one (the flow logs why)."""
    p = flow_run.parameters
    try:
        cfg = load_params(p["params_file"])
        cfg = apply_overrides(cfg, **{k: p.get(k) for k in OVERRIDES})
    except Exception:  # the flow body raises the same error into the run's logs and state
        return f"{p['stage']}-{Path(p['params_file']).stem}-invalid"
    return run_name(p["stage"], cfg)


def _stage_name(stage: str) -> Callable[[], str]:
    return lambda: run_name(stage, flow_run.parameters["cfg"])


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


# The parent MLflow run differs per flow run and resuming yields the same checkpoint: neither
# may defeat the cache.
EXPENSIVE = (
    (INPUTS - "parent_run_id" - "resume") + TASK_SOURCE + CachePolicy.from_cache_key_fn(_code_key)
)
# Tasks that run a model carry MODEL_TAG: `prefect concurrency-limit create dzad-model 1` keeps
# them to one at a time on a small GPU.
MODEL_TAG = "dzad-model"
CACHED = {"cache_policy": EXPENSIVE, "persist_result": True, "tags": [MODEL_TAG]}
IO_RETRIES = {"retries": 3, "retry_delay_seconds": [5, 30, 120], "retry_condition_fn": _transient}


def _missing(paths: list[Path]) -> bool:
    """A file a cached result stands for is gone: recompute instead of trusting the cache."""
    return any(not p.exists() for p in paths)


# ------------------------------------------------------------------------------------- tasks
@task(name="prepare-data", **IO_RETRIES)
def prepare_task(cfg: DZADConfig) -> dict[str, Path]:
    """Synthesise, download + convert (resumable) or check every dataset root."""
    return prepare_data(cfg)


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


@task(name="train", task_run_name="train-seed{seed}", **CACHED)
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
    ``resume`` continues the checkpoint a crashed run left in ``ckpt_dir`` (same config only)."""
    name = f"train-seed{seed}"
    with start_run(cfg, name, nested=True, parent_run_id=parent_run_id) as run:
        result = train_model(
            cfg,
            ckpt_dir,
            seed=seed,
            resume=resume,
            callbacks=training_callbacks(run, cfg),
            device=device,
        )
        seeded = with_seed(cfg, seed)
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
    name = f"evaluate-{target}-seed{seed}"
    with start_run(cfg, name, nested=True, parent_run_id=parent_run_id) as run:
        metrics = evaluate_target(Path(model["checkpoint"]), cfg, target, eval_dir)
        log_evaluation(run, target, metrics, eval_dir, cfg=cfg)
    return {"target": target, "seed": seed, "fingerprint": sha256_file(eval_dir / "metrics.json")}


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
    name = f"arm-{arm['kind']}={arm['value']}"
    with start_run(cfg, name, nested=True, parent_run_id=parent_run_id) as run:
        set_tags(run, cfg, {"dzad.ablation": arm["kind"], "dzad.setting": arm["value"]})
        frame = ablate(arm_config(cfg, arm), models_dir, eval_dirs, arm_dir)
        log_metrics(run, cfg, _arm_metrics(frame))
        log_table(run, "ablation", frame, cfg=cfg)
    return frame.to_dict("records")


# ------------------------------------------------------------------------------- stage flows
@flow(name="dzad-train", flow_run_name=_stage_name("train"), validate_parameters=False)
def train_flow(
    cfg: DZADConfig,
    out: Path,
    parent_run_id: str,
    checkpoint: str | None = None,
    register: bool = False,
    resume: bool = False,
) -> Models:
    """The data, then every seed trained in turn (or ``checkpoint`` resolved)."""
    prepare_task(cfg)
    manifests = preprocess_task(cfg)
    if checkpoint:
        return resolve_task(cfg, checkpoint)
    models: Models = {}
    for seed in cfg.seeds:  # in turn: one GPU, one training at a time
        ckpt_dir = seed_dir(out / "models", seed)
        train = train_task.with_options(refresh_cache=_missing([ckpt_dir / "dzad.json"]))
        models[seed] = train(
            cfg, ckpt_dir, seed, manifests, cfg.train.device, resume, parent_run_id
        )
        if register:
            models[seed]["version"] = register_task(cfg, models[seed])
    return models


@flow(name="dzad-evaluate", flow_run_name=_stage_name("evaluate"), validate_parameters=False)
def evaluate_flow(cfg: DZADConfig, models: Models, out: Path, parent_run_id: str) -> list[dict]:
    """Every (target, seed) pair as one mapped task."""
    if not cfg.sets.targets:
        raise ValueError("sets.targets is empty: nothing to evaluate")
    pairs = [(t, s) for t in cfg.sets.targets for s in models]
    dirs = [seed_dir(out / "eval" / t, s) for t, s in pairs]
    refresh = _missing([d / "metrics.json" for d in dirs])
    evaluate = evaluate_task.with_options(refresh_cache=refresh)
    return evaluate.map(
        unmapped(cfg),
        [models[s] for _, s in pairs],
        [t for t, _ in pairs],
        [s for _, s in pairs],
        dirs,
        unmapped(parent_run_id),
    ).result()


@flow(name="dzad-ablation", flow_run_name=_stage_name("ablation"), validate_parameters=False)
def ablation_flow(
    cfg: DZADConfig, models: Models, evals: list[dict], out: Path, parent_run_id: str
) -> pd.DataFrame:
    """Fan the arms out (mapped tasks), collect one AUROC table, log it on the parent run."""
    arms = ablation_arms(cfg)
    if not arms:
        raise ValueError("no ablation arms: ablation.weightings and ablation.t_starts are empty")
    dirs = [out / "ablation" / "arms" / f"{a['kind']}_{a['value']}" for a in arms]
    ckpts = [Path(m["checkpoint"]) for m in models.values()]
    models_dir = ckpts[0] if len(ckpts) == 1 else ckpts[0].parent  # checkpoints() reads it
    eval_dirs = {t: out / "eval" / t for t in dict.fromkeys(e["target"] for e in evals)}
    upstream = [m["fingerprint"] for m in models.values()] + [e["fingerprint"] for e in evals]
    run_arm = arm_task.with_options(refresh_cache=_missing([d / "ablation.csv" for d in dirs]))
    rows = run_arm.map(
        unmapped(cfg),
        arms,
        unmapped(models_dir),
        unmapped(eval_dirs),
        unmapped(upstream),
        dirs,
        unmapped(parent_run_id),
    ).result()
    table = pd.DataFrame([r for arm_rows in rows for r in arm_rows])
    folder = out / "ablation"
    atomic_write_text(folder / f"{ABLATION_TABLE}.csv", table.to_csv(index=False))
    atomic_write_text(folder / f"{ABLATION_TABLE}.md", table.to_markdown(index=False) + "\n")
    log_table(parent_run_id, ABLATION_TABLE, table, cfg=cfg)
    create_markdown_artifact(  # the table in the Prefect UI (Artifacts tab of the flow run)
        markdown=table.to_markdown(index=False),
        key=artifact_key(cfg),
        description=f"AUROC per ablation arm: {run_name('ablation', cfg)}",
    )
    return table


def artifact_key(cfg: DZADConfig) -> str:
    """Prefect artifact key of a study's ablation table (lowercase letters, digits, dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{cfg.study.lower()}-{ABLATION_TABLE.replace('_', '-')}")


def task_runner(dask_address: str | None) -> Any:
    """None: Prefect's thread pool. ``"local"``: a temporary Dask ``LocalCluster``; otherwise the
    address of a running Dask scheduler (``tcp://host:8786``). Needs ``pip install prefect-dask``.
    """
    if not dask_address:
        return None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise RuntimeError(
            f"dask_address={dask_address!r} needs prefect-dask: pip install prefect-dask"
        ) from exc
    return DaskTaskRunner() if dask_address == "local" else DaskTaskRunner(address=dask_address)


# ----------------------------------------------------------------------------- orchestrator
@flow(name="dzad", flow_run_name=_flow_run_name)
def dzad(
    stage: Stage = "ablation",
    params_file: str = "params.yaml",
    out_dir: str = "runs/prefect",
    seed: int | None = None,
    profile: Literal["tiny", "demo", "paper"] | None = None,
    steps: int | None = None,
    device: str | None = None,
    targets: list[str] | None = None,
    weightings: list[str] | None = None,
    t_starts: list[int] | None = None,
    architecture: bool | None = None,
    checkpoint: str | None = None,
    register_model: bool = False,
    resume: bool = False,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Run one study up to ``stage``; outputs go to ``<out_dir>/<study>/``.

    ``seed``: a one-seed study with this seed (default: the file's ``seeds``). ``device``: where
    training and evaluation run (``cuda``, ``cuda:1``, ``cpu``). ``checkpoint``: evaluate / ablate
    this checkpoint, models folder or ``models:/name@alias`` instead of training.
    ``register_model``: register every trained seed as the ``candidate`` model. ``resume``:
    continue the checkpoints a crashed training left behind (finished tasks are cached anyway).
    ``dask_address``: run the ablation arms on Dask (``local`` or ``tcp://scheduler:8786``).
    """
    overrides = dict(seed=seed, profile=profile, steps=steps, device=device, targets=targets)
    overrides.update(weightings=weightings, t_starts=t_starts, architecture=architecture)
    cfg = apply_overrides(load_params(params_file), **overrides)
    runner = task_runner(dask_address) if stage == "ablation" else None
    out = Path(out_dir) / cfg.study
    storage = {"result_storage": (out / RESULTS_DIR).resolve()}
    tags = {"dzad.stage": stage, "dzad.params_file": params_file}
    tags["prefect.flow_run_id"] = str(flow_run.id)
    with start_run(cfg, run_name(stage, cfg), tags=tags) as parent:
        pid = parent.info.run_id
        log_params(parent, cfg)
        models = train_flow.with_options(**storage)(
            cfg, out, pid, checkpoint, register_model, resume
        )
        cfg = replace(cfg, seeds=tuple(models))  # a given checkpoint may hold fewer seeds
        runs = {f"dzad.train_run.seed_{s}": m["run_id"] for s, m in models.items() if m["run_id"]}
        set_tags(pid, cfg, runs)
        result: dict[str, Any] = {"mlflow_run_id": pid, "models": models}
        if stage == "train":
            return result
        result["evaluations"] = evaluate_flow.with_options(**storage)(cfg, models, out, pid)
        if stage == "evaluate":
            return result
        options = {**storage, **({"task_runner": runner} if runner else {})}
        ablation_flow.with_options(**options)(cfg, models, result["evaluations"], out, pid)
        result["table"] = str(out / "ablation" / f"{ABLATION_TABLE}.csv")
        return result
