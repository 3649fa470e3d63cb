"""The flows' retry, cache and ablation-arm rules, without a Prefect API (fast tier).

tests/test_flows.py runs the flows for real (slow); these check the rules those runs rely on.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prefect.states import Failed

from dzad.overrides import Overrides, apply_overrides
from flows import parameters, tasks

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
