"""The flows' retry, cache, ablation-arm and regimes-scheduling rules, without a Prefect API
(fast tier).

tests/test_flows.py runs the flows for real (slow); these check the rules those runs rely on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prefect import unmapped
from prefect.states import Failed

from dzad.overrides import Overrides, apply_overrides
from dzad.study.seed_regimes import REGIME_DIRS
from flows import parameters, pipeline, tasks

TINY = Path(__file__).resolve().parents[1] / "studies" / "tiny.yaml"


def test_io_tasks_retry_an_oserror_and_never_a_bad_input():
    retry = tasks.IO_RETRIES["retry_condition_fn"]
    assert tasks.IO_RETRIES["retries"] > 0
    assert retry(None, None, Failed(data=ConnectionResetError("download interrupted")))
    assert retry(None, None, Failed(data=OSError(28, "No space left on device")))
    assert not retry(None, None, Failed(data=ValueError("sets.fetch: unknown dataset 'x'")))


def test_training_cache_key_reads_what_training_reads_only():
    cfg = parameters.load_params(TINY)
    key = tasks.training_inputs(cfg)
    assert key["seed"] == 0 and key["train.steps"] == cfg.train.steps
    unread = [
        replace(cfg, sets=replace(cfg.sets, targets={"mesh": cfg.sets.targets["mesh"]})),
        replace(cfg, ablation=replace(cfg.ablation, weightings=("snr",))),
        replace(cfg, tracking=replace(cfg.tracking, experiment="other")),
        replace(cfg, evaluate=replace(cfg.evaluate, controls=False)),
        replace(cfg, study="renamed"),
    ]
    for other in unread:
        assert tasks.training_inputs(other) == key
    read = [
        replace(cfg, seed=1),
        replace(cfg, train=replace(cfg.train, steps=cfg.train.steps + 1)),
        replace(cfg, sets=replace(cfg.sets, source=cfg.sets.source[:1] * 2)),
        replace(cfg, model=replace(cfg.model, sg_hint="latent")),
        replace(cfg, detection=replace(cfg.detection, gating_bank_size=3)),
        replace(cfg, anomaly_map=replace(cfg.anomaly_map, w_pn=3.0)),  # calibration scores maps
        replace(cfg, evaluate=replace(cfg.evaluate, batch_size=3)),
    ]
    for other in read:
        assert tasks.training_inputs(other) != key, other


def test_ablation_arms_and_each_arm_config_hold_one_setting():
    cfg = apply_overrides(
        parameters.load_params(TINY), Overrides(weightings=["uniform", "dzad"], t_starts=[500])
    )
    arms = tasks.ablation_arms(cfg)
    assert [(a["kind"], a["value"]) for a in arms] == [
        ("weighting", "uniform"),
        ("weighting", "dzad"),
        ("timesteps", 500),
    ]
    one = tasks.arm_config(cfg, arms[1]).ablation
    assert (one.weightings, one.t_starts, one.architecture) == (("dzad",), (), False)
    one = tasks.arm_config(cfg, arms[2]).ablation
    assert (one.weightings, one.t_starts, one.architecture) == ((), (500,), False)
    table3 = replace(
        cfg, ablation=replace(cfg.ablation, weightings=(), t_starts=(), architecture=True)
    )
    assert tasks.ablation_arms(table3) == [{"kind": "architecture", "value": "table3"}]


class _Stub:
    """Stands in for a Prefect flow or task: ``with_options`` -> itself; calls and ``map`` are
    recorded and return ``value`` (a call runs ``body`` when given: a flow's body, no engine)."""

    def __init__(self, value: Any = None, body: Callable[..., Any] | None = None) -> None:
        self.value, self.body, self.calls, self.options = value, body, [], []

    def with_options(self, **options: Any) -> _Stub:
        self.options.append(options)
        return self

    def __call__(self, *args: Any) -> Any:
        self.calls.append(args)
        return self.body(*args) if self.body else self.value

    def map(self, *args: Any) -> SimpleNamespace:
        self.calls.append(tuple(a.value if isinstance(a, unmapped) else a for a in args))
        return SimpleNamespace(result=lambda: self.value)


def test_orchestrator_maps_the_regimes_task_per_target_after_evaluate(tmp_path, monkeypatch):
    """``dzad(stage=evaluate|ablation)`` runs the regimes subflow, which maps one regimes task per
    target onto ``<out>/<study>/regimes/<target>`` and logs the regimes table on the parent run;
    ``stage=train`` schedules none. Only the orchestrator and the subflow's bodies run."""
    models = {0: {"checkpoint": "ckpt/seed_0", "fingerprint": "f0", "run_id": None}}
    done = [{"target": t, "summaries": {"few_shot": {}}} for t in ("objects", "mesh")]
    task = _Stub(done)
    table = SimpleNamespace(to_markdown=lambda: "| t |", write=lambda folder, stem: None)
    decisions = SimpleNamespace(write=lambda folder, stem: None)
    logged, artifacts, tables = [], [], []
    parent = SimpleNamespace(info=SimpleNamespace(run_id="parent"))
    stubs = {
        "train_flow": _Stub(models),
        "evaluate_flow": _Stub([]),
        "ablation_flow": _Stub(),
        "regimes_flow": _Stub(body=pipeline.regimes_flow.fn),
        "regimes_task": task,
        "start_run": lambda *a, **k: contextlib.nullcontext(parent),
        "log_params": lambda *a: None,
        "set_tags": lambda *a: None,
        "runnable_regimes": lambda ref: list(REGIME_DIRS),  # no dataset on disk here
        "regimes_table": lambda evals, dirs: table,
        "decisions_table": lambda evals, dirs: decisions,
        "log_regimes": lambda run, summaries, t, cfg: logged.append((run, summaries, t)),
        "log_table": lambda run, name, t, cfg: tables.append((run, name, t)),
        "create_markdown_artifact": lambda **kw: artifacts.append(kw),
    }
    for name, stub in stubs.items():
        monkeypatch.setattr(pipeline, name, stub)
    for stage, runs in (("train", 0), ("evaluate", 1), ("ablation", 2)):
        result = pipeline.dzad.fn(stage=stage, params_file=str(TINY), out_dir=str(tmp_path))
        assert len(task.calls) == runs, stage
    out = tmp_path / "tiny"
    cfg, given, targets, dirs = task.calls[-1]
    assert given == models and targets == list(cfg.sets.targets) == ["objects", "mesh"]
    assert dirs == [out / "regimes" / t for t in targets]
    assert task.options[-1] == {"refresh_cache": True}  # nothing on disk: never trust a cache
    assert result["regimes"] == done
    assert logged[-1] == ("parent", {t: {"few_shot": {}} for t in targets}, table)
    assert tables[-1] == ("parent", "decisions", decisions)
    assert artifacts[-1]["key"] == "tiny-regimes" and artifacts[-1]["markdown"] == "| t |"


def test_regimes_cache_key_follows_the_regime_settings_and_the_models():
    cfg = parameters.load_params(TINY)
    models = {0: {"checkpoint": "models/seed_0", "fingerprint": "f0", "run_id": "r"}}
    ctx = SimpleNamespace(task=tasks.regimes_task)

    def key(cfg, models) -> str:
        inputs = {"cfg": cfg, "models": models, "target": "mesh", "regime_dir": Path("r/mesh")}
        return tasks.regimes_task.cache_policy.compute_key(ctx, inputs, {})

    base = key(cfg, models)
    assert key(parameters.load_params(TINY), models) == base  # stable across calls
    changed = [
        replace(cfg, regime=replace(cfg.regime, few_shot_k=cfg.regime.few_shot_k + 1)),
        replace(cfg, regime=replace(cfg.regime, dzad_weight=0.0)),
        replace(cfg, regime=replace(cfg.regime, image_size=64)),
    ]
    for other in changed:
        assert key(other, models) != base, other.regime
    retrained = {0: {**models[0], "fingerprint": "f1"}}
    assert key(cfg, retrained) != base
