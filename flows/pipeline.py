"""Prefect flows of DZAD: the orchestrator flow ``dzad`` and its stage subflows.

``dzad(stage=...)`` runs one study as far as ``stage``: ``train`` (prepare + preprocess the data,
train every seed), ``evaluate`` (+ every target, then its scoring regimes: the DVC ``regimes``
stage) or ``ablation`` (+ the ablation arms as mapped tasks, collected into one AUROC table). The
three deployments of ``flows/serve.py`` differ only in that default. Tasks (:mod:`flows.tasks`)
call :mod:`dzad.study` (the implementation the CLI and the DVC stages share) and
:mod:`flows.tracking` (every MLflow call); this module only orchestrates: the stage flows and the
orchestrator.

- Parameters (:mod:`flows.parameters`): ``params_file`` is parsed once per file content
  (:func:`dzad.config.load`); the other parameters override it (None keeps the file's value).
- Retries: only on I/O tasks (downloads, registry) and only for ``OSError`` (network, disk).
- Caching: training, evaluation, regimes and ablation arms are cached on their inputs (resolved
  config, paths, upstream fingerprints), the task's source and the ``dzad`` code version; results
  persist in ``<out_dir>/<study>/.prefect-results``, so a re-run after a crash reuses what
  finished. A cached result is trusted only while the files it wrote still exist.
- MLflow: one parent run per flow run (same name); training, evaluation and every ablation arm are
  nested runs; the regimes' metrics and table and the collected ablation table are on the parent.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from prefect import flow, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from dzad.config import DZADConfig
from dzad.io_utils import atomic_write_text
from dzad.overrides import Overrides, apply_overrides
from dzad.study.layout import seed_dir, target_ref
from dzad.study.report_folder import decisions_table, regimes_table
from dzad.study.seed_evaluation import SUMMARY
from dzad.study.seed_regimes import runnable_regimes
from dzad.study.seed_training import resumable
from flows.parameters import (
    flow_run_name,
    load_params,
    own_data,
    run_name,
    stage_run_name,
)
from flows.tasks import (
    Models,
    ablation_arms,
    arm_task,
    evaluate_task,
    models_folder,
    prepare_task,
    preprocess_task,
    regimes_task,
    register_task,
    resolve_task,
    train_task,
)
from flows.tracking.results import log_regimes, log_table
from flows.tracking.runs import log_params, set_tags, start_run

Stage = Literal["train", "evaluate", "ablation"]
STAGES: tuple[Stage, ...] = ("train", "evaluate", "ablation")
RESULTS_DIR = ".prefect-results"
ABLATION_TABLE = "ablation_auroc"
REGIMES_TABLE = "regimes"  # reports/regimes.md's name
DECISIONS_TABLE = "decisions"  # reports/decisions.md's


def _missing(paths: list[Path]) -> bool:
    """A file a cached result stands for is gone: recompute instead of trusting the cache."""
    return any(not p.exists() for p in paths)


# ------------------------------------------------------------------------------- stage flows
@flow(name="dzad-train", flow_run_name=stage_run_name("train"), validate_parameters=False)
def train_flow(
    cfg: DZADConfig,
    out: Path,
    parent_run_id: str,
    checkpoint: str | None = None,
    register: bool = False,
    resume: bool = False,
) -> Models:
    """The data, then every seed trained in turn (or ``checkpoint`` resolved)."""
    prepare_task(cfg, out / "data" / "raw")
    manifests = preprocess_task(cfg)
    manifests = {k: v for k, v in manifests.items() if k.startswith("source_")}  # what it reads
    if checkpoint:
        return resolve_task(cfg, checkpoint)
    models: Models = {}
    cont = resumable(out / "models", cfg.seeds) if resume else dict.fromkeys(cfg.seeds, False)
    for seed in cfg.seeds:  # in turn: one GPU, one training at a time
        ckpt_dir = seed_dir(out / "models", seed)
        train = train_task.with_options(refresh_cache=_missing([ckpt_dir / "dzad.json"]))
        models[seed] = train(
            cfg, ckpt_dir, seed, manifests, cfg.train.device, cont[seed], parent_run_id
        )
        if register:
            models[seed]["version"] = register_task(cfg, models[seed])
    return models


@flow(name="dzad-evaluate", flow_run_name=stage_run_name("evaluate"), validate_parameters=False)
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


def _regime_files(cfg: DZADConfig, regime_dirs: dict[str, Path]) -> list[Path]:
    """What a target's cached regimes stand for: each runnable regime's summary and seeds."""
    files = []
    for target, folder in regime_dirs.items():
        for name in runnable_regimes(target_ref(cfg, target)):
            files.append(folder / name / SUMMARY)
            files += [seed_dir(folder / name, s) / "metrics.json" for s in cfg.seeds]
    return files


@flow(name="dzad-regimes", flow_run_name=stage_run_name("regimes"), validate_parameters=False)
def regimes_flow(cfg: DZADConfig, models: Models, out: Path, parent_run_id: str) -> list[dict]:
    """Batch zero-shot and few-shot K on every target, one mapped task per target (it scores every
    seed); then ``reports/regimes.md``'s table (needs the evaluate stage's ``eval/<target>/``) in
    ``regimes/``, on the parent run with the regimes' metrics, and in the Prefect UI."""
    regime_dirs = {t: out / "regimes" / t for t in cfg.sets.targets}
    refresh = _missing(_regime_files(cfg, regime_dirs))
    done = (
        regimes_task.with_options(refresh_cache=refresh)
        .map(unmapped(cfg), unmapped(models), list(regime_dirs), list(regime_dirs.values()))
        .result()
    )
    eval_dirs = {t: out / "eval" / t for t in regime_dirs}
    table = regimes_table(eval_dirs, regime_dirs)
    table.write(out / "regimes", REGIMES_TABLE)
    log_regimes(parent_run_id, {r["target"]: r["summaries"] for r in done}, table, cfg=cfg)
    decisions = decisions_table(eval_dirs, regime_dirs)
    decisions.write(out / "regimes", DECISIONS_TABLE)
    log_table(parent_run_id, DECISIONS_TABLE, decisions, cfg=cfg)
    create_markdown_artifact(
        markdown=table.to_markdown(),
        key=artifact_key(cfg, REGIMES_TABLE),
        description=f"The scoring regimes (macro means): {run_name('regimes', cfg)}",
    )
    return done


@flow(name="dzad-ablation", flow_run_name=stage_run_name("ablation"), validate_parameters=False)
def ablation_flow(
    cfg: DZADConfig, models: Models, evals: list[dict], out: Path, parent_run_id: str
) -> pd.DataFrame:
    """Fan the arms out (mapped tasks), collect one AUROC table, log it on the parent run."""
    arms = ablation_arms(cfg)
    if not arms:
        raise ValueError("no ablation arms: ablation.weightings and ablation.t_starts are empty")
    dirs = [out / "ablation" / "arms" / f"{a['kind']}_{a['value']}" for a in arms]
    models_dir = models_folder(models)
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
        key=artifact_key(cfg, ABLATION_TABLE),
        description=f"AUROC per ablation arm: {run_name('ablation', cfg)}",
    )
    return table


def artifact_key(cfg: DZADConfig, table: str) -> str:
    """Prefect artifact key of a study's table (lowercase letters, digits, dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{cfg.study.lower()}-{table.replace('_', '-')}")


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
@flow(name="dzad", flow_run_name=flow_run_name)
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
    # the parameters that are overrides (dzad.overrides.Overrides), as this flow run received them
    overrides = Overrides.from_mapping(flow_run.parameters)
    cfg = apply_overrides(load_params(params_file), overrides)
    runner = task_runner(dask_address) if stage == "ablation" else None
    out = Path(out_dir) / cfg.study
    cfg = own_data(cfg, out)  # never DVC's data/raw or data/cache
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
        result["regimes"] = regimes_flow.with_options(**storage)(cfg, models, out, pid)
        if stage == "evaluate":
            return result
        options = {**storage, **({"task_runner": runner} if runner else {})}
        ablation_flow.with_options(**options)(cfg, models, result["evaluations"], out, pid)
        result["table"] = str(out / "ablation" / f"{ABLATION_TABLE}.csv")
        return result
