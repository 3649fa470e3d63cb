"""Checkpoint loading: thread-safe (no process-global state), local files only."""

from __future__ import annotations

import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from typer.testing import CliRunner

from dzad.cli import app
from dzad.errors import CheckpointError
from dzad.model import DZAD

N_THREADS = 4


def _outputs(model: DZAD, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images).detection_score  # the backbone is random: leave it out


def test_threads_load_at_once_and_later_loads_still_work(tiny_checkpoint, synth_root):
    """N threads load together (a barrier lines them up); every copy scores like a lone load,
    and a module built in another thread meanwhile gets real (non-meta, initialised) weights."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    barrier = threading.Barrier(N_THREADS + 1)

    def load(_: int) -> DZAD:
        barrier.wait()
        return DZAD.from_checkpoint(tiny_checkpoint, random_backbone=True)

    def build(_: int) -> torch.nn.Linear:
        barrier.wait()
        return torch.nn.Linear(64, 64)

    with ThreadPoolExecutor(N_THREADS + 1) as pool:
        loads = [pool.submit(load, i) for i in range(N_THREADS)]
        built = pool.submit(build, 0)
        models = [f.result() for f in loads]
        linear = built.result()
    assert not linear.weight.is_meta and linear.weight.abs().sum() > 0
    alone = DZAD.from_checkpoint(tiny_checkpoint, random_backbone=True)  # after: still loads
    reference = _outputs(alone, images)
    for model in models:
        assert all(not p.is_meta for p in model.parameters())
        assert torch.allclose(_outputs(model, images), reference)


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test (a hub request would be one)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("part", ["unet", "sg", "extra.safetensors"])
def test_missing_part_fails_fast_and_names_it(
    tiny_checkpoint, tmp_path, monkeypatch, no_network, part
):
    """A relative checkpoint folder missing a part: a CheckpointError naming it, no hub request
    (diffusers would take the relative folder name for a hub repo id)."""
    shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    target = tmp_path / "ck" / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=rf"{part}/? is missing"):
        DZAD.from_checkpoint("ck", random_backbone=True)


def test_cli_missing_unet_is_one_line_exit_2(tiny_checkpoint, tmp_path, monkeypatch, no_network):
    shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    shutil.rmtree(tmp_path / "ck" / "unet")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "img.png").write_bytes(b"")  # never read: the model loads first
    result = CliRunner().invoke(
        app, ["score", "img.png", "--model", "ck", "--out", "out", "--random-backbone"]
    )
    assert result.exit_code == 2
    assert "unet/ is missing" in result.stderr and "Traceback" not in result.output
