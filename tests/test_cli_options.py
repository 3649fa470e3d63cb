"""The same option means the same thing in every command, and choices show in --help."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from dzad.cli import app
from dzad.cli._app import split_list

runner = CliRunner()


def _help(command: str) -> str:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return re.sub(r"\s+", " ", result.stdout)


def test_choices_and_shared_spellings_in_help():
    train, score, evaluate = _help("train"), _help("score"), _help("evaluate")
    assert "tiny|demo|real|paper" in train and "auto|cpu|cuda" in train
    assert "models:/<name>@<alias>" in score and "models:/<name>@<alias>" in evaluate
    for text in (train, evaluate):  # one spelling, one meaning
        assert "--source-categories" in text and "repeat the option or comma-separate" in text


def test_a_bad_choice_stops_before_anything_is_written(tmp_path):
    out = tmp_path / "ckpt"
    args = ["train", "--data", str(tmp_path), "--out", str(out), "--profile", "huge"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "huge" in result.output
    assert not out.exists()


def test_repeated_and_comma_separated_values_flatten():
    assert split_list(["a,b", "c", " d , "]) == ["a", "b", "c", "d"]
    assert split_list(None) == []
