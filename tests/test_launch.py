"""train.processes: the DVC stage / Prefect task path through `accelerate launch` (dzad.launch,
dzad.study.seed_training.train_launched)."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dzad import config
from dzad.checkpoint import load_checkpoint
from dzad.cli import app
from dzad.config import TrainConfig
from dzad.launch import check_processes, launch_command, result_path
from dzad.study.data import prepare_data, preprocess_data
from dzad.study.seed_training import train_seeds
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


def test_processes_that_each_train_alone_are_an_error(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` style: 2 started, each sees a world of 1."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="accelerate started 2 processes but this one sees 1"):
        check_processes(TrainConfig(batch_size=8, processes=2), running=1)
    check_processes(TrainConfig(batch_size=8, processes=2), running=2)


def test_in_process_training_refuses_a_process_count_it_does_not_have(tmp_path):
    cfg = _study(2)
    with pytest.raises(ValueError, match=r"train\.processes is 2 but 1 process"):
        train(cfg, torch.rand(8, 3, 32, 32), tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt").exists()


def test_stage_reports_an_indivisible_batch_before_launching(tmp_path, monkeypatch):
    """`dzad stage train` (in process: the `python -m dzad` wrapper adds nothing) refuses the
    batch before it reads data or launches anything."""
    cfg = _study(3)  # batch 4 on 3 processes
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(config.to_dict(cfg)))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["stage", "train", "--params", str(params), "--out", "m"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: train.batch_size 4 is not divisible by train.processes 3: each process takes "
        "batch_size / processes images per step"
    )
    assert not (tmp_path / "m").exists()


def test_launch_command_uses_multi_gpu_never_cpu_flag():
    cmd = launch_command(2, ["--params", "p.yaml", "--out", "o"], port=29999)
    assert "--multi_gpu" in cmd and "--cpu" not in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-6:] == ["-m", "dzad.study.seed_training", "--params", "p.yaml", "--out", "o"]


@pytest.mark.slow
def test_two_cpu_processes_train_the_checkpoint_one_process_trains(tmp_path, monkeypatch):
    """The stage's code path (train_seeds) on 2 gloo processes = 1 process: same weights, losses
    and calibration (the global batch and its draws are split, DDP averages the gradients)."""
    import dzad.study.seed_training

    monkeypatch.chdir(tmp_path)
    one, two = _study(1), _study(2)
    prepare_data(one)
    preprocess_data(one)
    commands, real_run = [], subprocess.run

    def run(cmd, **kwargs):
        commands.append(cmd)
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(dzad.study.seed_training.subprocess, "run", run)
    r1 = train_seeds(one, "m1")[0]
    assert commands == []  # one process: in this one
    r2 = train_seeds(two, "m2")[0]
    assert len(commands) == 1 and "--multi_gpu" in commands[0]
    assert commands[0][commands[0].index("--num_processes") + 1] == "2"
    assert not result_path(Path("m2/seed_0")).exists()  # read back and removed
    assert sorted(p.name for p in Path("m2").iterdir()) == ["seed_0"]
    assert len(r1.losses) == len(r2.losses) == 6
    torch.testing.assert_close(torch.tensor(r2.losses), torch.tensor(r1.losses), rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    w1 = load_checkpoint("m1/seed_0")[2].state_dict()
    w2 = load_checkpoint("m2/seed_0")[2].state_dict()
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    assert r2.calibration.tau == pytest.approx(r1.calibration.tau, rel=1e-3)


def test_gradient_checkpointing_saves_activations_and_keeps_the_gradients():
    """train.gradient_checkpointing: UNet and SG keep far fewer activations for the backward and
    compute the same gradients."""
    from dzad.config import ModelConfig
    from dzad.networks import build_network
    from dzad.training_loop import enable_gradient_checkpointing

    # latent hint: at this width the image hint's embedding (not checkpointed) would dominate
    cfg = ModelConfig(profile="paper", latent="vae", block_out_channels=(8, 8), sg_hint="latent")
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    hint = z

    def run(checkpointing: bool) -> tuple[int, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        net = build_network(cfg, 4, 8, image_size=64).train()
        for p in net.sg.controlnet_mid_block.parameters():  # a live SG (zero convs start at 0)
            torch.nn.init.normal_(p, std=0.1)
        if checkpointing:
            enable_gradient_checkpointing(net)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda x: saved.append(x.numel() * x.element_size()) or x, lambda x: x
        ):
            loss = net(z, t, hint).pow(2).mean()
        loss.backward()
        grads = {k: p.grad for k, p in net.named_parameters() if p.grad is not None}
        return sum(saved), grads

    plain, grads = run(False)
    ckpt, grads_ckpt = run(True)
    assert ckpt < plain / 3  # measured: 0.21 of the activations
    assert grads.keys() == grads_ckpt.keys() and grads
    for k in grads:
        torch.testing.assert_close(grads_ckpt[k], grads[k], msg=k)


def test_step_batches_follow_the_step_order_per_process():
    """The batches one process reads, in step order (in process; the worker processes' reading
    of the same batches is the slow test below)."""
    from dzad.data.source import ImageSource
    from dzad.training_loop import StepBatches, step_loader

    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batches = StepBatches(ImageSource(images), torch.arange(10), 4, 0, rank=1, world=2)
    inline = list(step_loader(batches, 2, 6, workers=0))
    assert len(inline) == 4
    for (i0, x0), step in zip(inline, range(2, 6), strict=True):
        assert torch.equal(i0, batches[step][0]) and len(i0) == 2
        assert torch.equal(x0, images[i0])


@pytest.mark.slow  # DataLoader worker processes and three trainings
def test_worker_processes_read_the_batches_the_loop_reads(tmp_path, monkeypatch):
    """train.num_workers: the DataLoader's workers decode the same batches, in step order, and a
    streamed run trains exactly what the in-process reading trains."""
    from torch.utils.data import TensorDataset

    import dzad.training_loop
    from dzad.data.source import ImageSource
    from dzad.training_loop import StepBatches, step_loader

    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batches = StepBatches(ImageSource(images), torch.arange(10), 4, 0, rank=1, world=2)
    inline = list(step_loader(batches, 2, 6, workers=0))
    workers = list(step_loader(batches, 2, 6, workers=2))
    assert len(inline) == len(workers) == 4
    for (i0, x0), (i1, x1), step in zip(inline, workers, range(2, 6), strict=True):
        assert torch.equal(i0, i1) and torch.equal(x0, x1) and len(i0) == 2
        assert torch.equal(i0, batches[step][0])
    base = replace(_study(1), data=replace(_study(1).data, image_size=32))
    used = []  # the worker count train() gives its loader

    def spy(batches, start, steps, workers):
        used.append(workers)
        return step_loader(batches, start, steps, workers)

    monkeypatch.setattr(dzad.training_loop, "step_loader", spy)
    losses = []
    for workers_n in (0, 2):
        tc = replace(base.train, steps=3, num_workers=workers_n, preload_max_mb=0)
        stream = TensorDataset(images)  # a Dataset too big to preload (preload_max_mb 0)
        r = train(replace(base, train=tc), stream, tmp_path / f"w{workers_n}", progress=False)
        losses.append(r.losses)
    assert used == [0, 2] and losses[0] == losses[1]
    # images held in memory (a tensor) are sliced in the loop: no worker processes
    tc = replace(base.train, steps=1, num_workers=2)
    train(replace(base, train=tc), images, tmp_path / "mem", progress=False)
    assert used[-1] == 0
