"""A checkpoint records what it was trained on; evaluate reads it; resume refuses other data.

Covers `dzad train --data` then `dzad evaluate --model --data`, and resuming on other data.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from dzad.checkpoint import read_meta
from dzad.cli import app
from dzad.config import to_dict

runner = CliRunner()


@pytest.fixture(scope="module")
def params(tmp_path_factory, tiny_config) -> Path:
    """The tiny config, 3 steps, with the default study's SOURCE (data/raw/synth/textures)."""
    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, steps=3))
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory, synth_root) -> Path:
    """A copy of the synthetic textures (weave, grain) that the tests may alter."""
    root = tmp_path_factory.mktemp("src") / "textures"
    for cat in ("weave", "grain"):
        shutil.copytree(synth_root / cat, root / cat)
    return root


def _train(params: Path, data: Path, out: Path, *extra: str):
    args = ["train", "--data", str(data), "--source-categories", "weave"]
    return runner.invoke(app, [*args, "--params", str(params), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, params, source) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "ckpt"
    result = _train(params, source, out)
    assert result.exit_code == 0, result.output
    return out


def test_checkpoint_records_its_real_training_data(trained, source):
    meta = read_meta(trained)
    record = meta["data"]
    n = len(list((source / "weave" / "train" / "good").iterdir()))
    assert record["roots"] == [str(source.resolve())]
    assert record["categories"] == ["weave"] and record["images"] == n
    assert len(record["manifest_sha256"]) == 64
    assert meta["config"]["sets"]["source"] == [
        {"root": str(source.resolve()), "categories": ["weave"]}
    ]


def test_evaluate_with_model_and_data_only(trained, synth_root, tmp_path, monkeypatch):
    """No --source: the controls' SOURCE normals come from the checkpoint's record (run from a
    folder where the default study's data/raw/... does not exist)."""
    monkeypatch.chdir(tmp_path)
    args = ["evaluate", "--model", str(trained), "--data", str(synth_root), "--out", "out"]
    result = runner.invoke(app, [*args, "--categories", "mesh"])
    assert result.exit_code == 0, result.output
    assert "model trained on" in result.output and "of weave from" in result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["controls"]  # scored against the SOURCE it was trained on


def test_resume_refuses_other_source_data(params, source, tmp_path):
    """Same config and root, one training image changed since: resume refuses."""
    ckpt, changed = tmp_path / "ckpt", tmp_path / "textures"
    shutil.copytree(source, changed)
    assert _train(params, changed, ckpt).exit_code == 0
    before = read_meta(ckpt)
    image = sorted((changed / "weave" / "train" / "good").iterdir())[0]
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    result = _train(params, changed, ckpt, "--resume", "--steps", "4")
    assert result.exit_code == 2
    assert "source data differs" in result.output
    assert read_meta(ckpt) == before  # nothing written


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_resume_with_nothing_to_resume_is_an_error(params, source, tmp_path, folder):
    out = tmp_path / folder
    if folder == "empty":
        out.mkdir()
    result = _train(params, source, out, "--resume")
    assert result.exit_code == 2 and "nothing to resume" in result.output
    assert not (out / "dzad.json").exists()


def test_resume_on_the_same_data_continues(trained, params, source, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    result = _train(params, source, ckpt, "--resume", "--steps", "4")
    assert result.exit_code == 0, result.output
    assert read_meta(ckpt)["train"]["step"] == 4
    assert read_meta(ckpt)["data"] == read_meta(trained)["data"]
