"""One progress display (:mod:`dzad.progress`): a bar on a terminal, periodic log lines elsewhere,
for training steps and scored images alike."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from dzad.cli import app
from dzad.progress import Progress

runner = CliRunner()


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_off_a_terminal_lines_are_periodic_and_the_last_one_closes(capsys):
    with Progress(10, "train", "steps", every_s=3600) as bar:
        for _ in range(10):
            bar.advance(1, loss="0.5000")
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1  # one closing line, not a refresh per step
    assert lines[0].startswith("train: 10/10 steps (100%), ") and lines[0].endswith("loss 0.5000")
    with Progress(4, "scoring", "images", every_s=0) as bar:
        bar.advance(1)
        bar.advance(1)
    lines = _lines(capsys.readouterr().err)
    assert lines[:2] == [lines[0], lines[1]] and lines[0].startswith("scoring: 1/4 images (25%)")
    assert "left" in lines[0] and lines[1].startswith("scoring: 2/4 images (50%)")
    assert len(lines) == 3  # and the closing line


def test_a_failed_or_disabled_run_writes_no_progress(capsys):
    with pytest.raises(RuntimeError), Progress(5, "train", "steps", every_s=3600) as bar:
        bar.advance(2)
        raise RuntimeError("stop")
    with Progress(5, "train", "steps", enabled=False, every_s=0) as bar:
        bar.advance(5)
    assert capsys.readouterr().err == ""


def test_on_a_terminal_it_is_a_bar(monkeypatch, capsys):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # what rich reads to treat stderr as a terminal
    with Progress(3, "train", "steps", every_s=0) as bar:
        assert bar.bar is not None
        bar.advance(3)
    assert "train: 3/3 steps" not in capsys.readouterr().err  # no log lines beside the bar


def test_training_logs_lines_not_bar_refreshes(capsys, tmp_path, tiny_config):
    from dzad.training import train

    cfg = replace(tiny_config, train=replace(tiny_config.train, steps=6))
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    train(cfg, images, tmp_path / "ckpt", progress=True)
    err = capsys.readouterr().err
    lines = [ln for ln in _lines(err) if ln.startswith("train: ")]
    assert "\r" not in err and len(lines) == 1
    assert lines[0].startswith("train: 6/6 steps (100%)") and "loss " in lines[0]


@pytest.mark.slow  # a whole evaluate; the progress lines themselves are the fast tests above
def test_evaluate_logs_its_closing_line(tmp_path, tiny_checkpoint, synth_root):
    args = ["evaluate", "-m", str(tiny_checkpoint), "--data", str(synth_root), "--no-controls"]
    args += ["--categories", "grain", "--out", str(tmp_path), "--random-backbone"]
    args += ["--max-images", "3"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert _lines(result.stderr) == []  # --json: nothing but the JSON
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [ln for ln in _lines(result.stderr) if "evaluating" in ln]
    assert len(lines) == 1 and lines[0].startswith("evaluating: 3/3 images (100%)")
