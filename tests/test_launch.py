"""train.processes: the DVC stage / Prefect task path through `accelerate launch` (dzad.launch)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from dzad import config
from dzad.checkpoint import load_checkpoint
from dzad.config import TrainConfig
from dzad.launch import check_processes, launch_command, result_path
from dzad.study.data import prepare_data, preprocess_data
from dzad.study.models import train_seeds
from dzad.training import train

REPO = Path(__file__).resolve().parents[1]


def _study(processes: int) -> config.DZADConfig:
    """studies/tiny.yaml cut to one texture, 6 steps at batch 4, on ``processes`` processes."""
    cfg = config.load(REPO / "studies" / "tiny.yaml")
    return replace(
        cfg,
        synth=replace(cfg.synth, families=("textures",), n_train=12, n_test_good=1,
                      n_test_defect=1),
        sets=replace(
            cfg.sets,
            source=(config.DatasetRef("data/raw/synth/textures", ("weave",)),),
            targets={"grain": config.DatasetRef("data/raw/synth/textures", ("grain",))},
        ),
        train=replace(cfg.train, steps=6, batch_size=4, device="auto", processes=processes),
        detection=replace(cfg.detection, position_images=4),
    )  # fmt: skip


def test_batch_must_divide_by_the_process_count():
    check_processes(TrainConfig(batch_size=8, processes=2))
    with pytest.raises(
        ValueError, match=r"train.batch_size 5 is not divisible by train.processes 2"
    ):
        check_processes(TrainConfig(batch_size=5, processes=2))
    with pytest.raises(ValueError, match=r"train\.processes must be >= 1"):
        check_processes(TrainConfig(processes=0))


def test_in_process_training_refuses_a_process_count_it_does_not_have(tmp_path):
    cfg = _study(2)
    with pytest.raises(ValueError, match=r"train\.processes is 2 but 1 process"):
        train(cfg, torch.rand(8, 3, 32, 32), tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt").exists()


def test_stage_reports_an_indivisible_batch_before_launching(tmp_path):
    cfg = _study(3)  # batch 4 on 3 processes
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(config.to_dict(cfg)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "dzad", "stage", "train", "--params", str(params), "--out", "m"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: train.batch_size 4 is not divisible by train.processes 3: each process takes "
        "batch_size / processes images per step"
    )
    assert not (tmp_path / "m").exists()


def test_launch_command_uses_multi_gpu_never_cpu_flag():
    cmd = launch_command(2, ["--params", "p.yaml", "--out", "o"], port=29999)
    assert "--multi_gpu" in cmd and "--cpu" not in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-6:] == ["-m", "dzad.launch", "--params", "p.yaml", "--out", "o"]


@pytest.mark.slow
def test_two_cpu_processes_train_the_checkpoint_one_process_trains(tmp_path, monkeypatch):
    """The stage's code path (train_seeds) on 2 gloo processes = 1 process: same weights, losses
    and calibration (the global batch and its draws are split, DDP averages the gradients)."""
    monkeypatch.chdir(tmp_path)
    one, two = _study(1), _study(2)
    prepare_data(one)
    preprocess_data(one)
    r1 = train_seeds(one, "m1")[0]
    r2 = train_seeds(two, "m2")[0]
    assert result_path(Path("m2/seed_0")).is_file()
    assert len(r1.losses) == len(r2.losses) == 6
    torch.testing.assert_close(torch.tensor(r2.losses), torch.tensor(r1.losses), rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    w1 = load_checkpoint("m1/seed_0")[2].state_dict()
    w2 = load_checkpoint("m2/seed_0")[2].state_dict()
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    assert r2.calibration.tau == pytest.approx(r1.calibration.tau, rel=1e-3)
