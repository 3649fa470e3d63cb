"""`dzad score` / `dzad evaluate` on good and bad input: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from dzad.cli import app
from dzad.errors import BackboneUnavailable
from dzad.panels import BAR_W, CAPTION_H

runner = CliRunner()


def _score(*args: str):
    return runner.invoke(app, ["score", *map(str, args)])


def _error_line(result) -> str:
    """The single error line on stderr (no traceback)."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory, synth_root) -> Path:
    """Two folders holding files of the same name, plus a JPEG."""
    root = tmp_path_factory.mktemp("imgs")
    for sub, cat in (("a", "grain"), ("b", "weave")):
        (root / sub).mkdir()
        for name in ("000.png", "001.png"):
            shutil.copy(synth_root / cat / "test" / "good" / name, root / sub / name)
    Image.open(root / "a" / "000.png").convert("RGB").save(root / "b" / "photo.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def scored(tmp_path_factory, images, tiny_checkpoint):
    out = tmp_path_factory.mktemp("score") / "out"
    result = _score(
        images,
        "--model",
        tiny_checkpoint,
        "--out",
        out,
        "--random-backbone",
        "--save-maps",
        "--pictures",
        "--batch-size",
        "2",
    )
    return result, out


def test_score_folder_writes_scores_and_mirrored_heatmaps(scored, images):
    result, out = scored
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "scores.csv")
    assert list(table.columns[:4]) == ["path", "image_score", "detection_score", "decision"]
    assert len(table) == 5 and set(table.decision) <= {"normal", "anomalous"}
    heatmaps = sorted(
        p.relative_to(out / "heatmaps").as_posix() for p in (out / "heatmaps").rglob("*.png")
    )
    assert heatmaps == [
        "a/000.png.heatmap.png",
        "a/001.png.heatmap.png",
        "b/000.png.heatmap.png",
        "b/001.png.heatmap.png",
        "b/photo.jpg.heatmap.png",
    ]
    panels = sorted(p.relative_to(out / "panels").as_posix() for p in (out / "panels").rglob("*"))
    assert [p for p in panels if p.endswith(".png")] == [
        h.replace(".heatmap.", ".panel.") for h in heatmaps
    ]
    # --random-backbone: no calibrated map threshold, so no region tile: original | overlay | bar
    w, h = Image.open(out / "panels/a/000.png.panel.png").size
    assert (w, h) == (2 * 256 + 4 + BAR_W, 256 + CAPTION_H)
    raw = np.load(out / "maps" / "b" / "photo.jpg.npy")
    assert raw.shape == (32, 32) and np.isfinite(raw).all()
    assert "DZAD scores" in result.stdout


def test_score_draws_pictures_only_with_the_option(scored, images, tiny_checkpoint, tmp_path):
    """Without --pictures: the same scores, no picture folder or column, the report says why."""
    _, with_pictures = scored
    out = tmp_path / "plain"
    args = ["--model", tiny_checkpoint, "--out", out, "--random-backbone", "--batch-size", "2"]
    result = _score(images, *args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if p.name != ".dzad.lock") == [
        "report.html",
        "scores.csv",
    ]
    plain, drawn = pd.read_csv(out / "scores.csv"), pd.read_csv(with_pictures / "scores.csv")
    columns = ["path", "image_score", "detection_score", "decision", "normalised_score"]
    pd.testing.assert_frame_equal(plain[columns], drawn[columns])
    assert plain[["heatmap", "panel", "thumb", "mask"]].isna().all().all()
    assert drawn[["heatmap", "panel", "thumb"]].notna().all().all()
    assert "rerun with --pictures" in (out / "report.html").read_text()


def test_score_decodes_each_image_once(images, tiny_checkpoint, tmp_path, monkeypatch):
    import dzad.data.images

    real, calls = dzad.data.images.load_image, []

    def counted(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dzad.data.images, "load_image", counted)
    result = _score(
        images, "--model", tiny_checkpoint, "--out", tmp_path / "o", "--random-backbone"
    )
    assert result.exit_code == 0, result.output
    assert sorted(calls) == sorted(["000.png", "001.png"] * 2 + ["photo.jpg"])


def test_score_json_threshold_and_glob(images, tiny_checkpoint, tmp_path, scored):
    _, first = scored
    reference = pd.read_csv(first / "scores.csv").set_index("path")
    pattern = str(images / "*" / "00[01].png")
    thr = float(reference.image_score.median())
    result = _score(
        pattern,
        "--model",
        tiny_checkpoint,
        "--out",
        tmp_path / "o",
        "--random-backbone",
        "--json",
        "--threshold",
        str(thr),
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert len(rows) == 4
    for r in rows:  # same scores whatever the batch, and the numeric threshold decides
        assert r["image_score"] == pytest.approx(reference.loc[r["path"], "image_score"], rel=1e-4)
        assert r["decision"] == ("anomalous" if r["image_score"] > thr else "normal")
    bad = _score(images, "--model", tiny_checkpoint, "--threshold", "high")
    assert bad.exit_code == 2


def test_output_folder_inside_the_inputs_is_not_rescored(images, tiny_checkpoint, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(images / "a", folder)
    for _ in range(2):
        result = _score(folder, "-m", tiny_checkpoint, "-o", folder / "res", "--random-backbone")
        assert result.exit_code == 0, result.output
        assert len(pd.read_csv(folder / "res" / "scores.csv")) == 2


@pytest.fixture()
def bad_inputs(tmp_path) -> dict[str, Path]:
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 40), (120, 30, 200)).save(good)
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    return {
        "good": good,
        "zero": zero,
        "truncated": truncated,
        "text": text,
        "empty": empty,
        "missing": tmp_path / "missing.png",
    }


@pytest.mark.parametrize("kind", ["zero", "truncated", "text", "empty", "missing"])
def test_bad_input_is_one_line_error_and_nothing_is_lost(
    kind, bad_inputs, tiny_checkpoint, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.csv").write_text("previous results\n")
    result = _score(
        bad_inputs["good"],
        bad_inputs[kind],
        "--model",
        tiny_checkpoint,
        "--out",
        out,
        "--random-backbone",
    )
    assert result.exit_code == 2
    line = _error_line(result)
    assert line.startswith("error: ") and bad_inputs[kind].name in line
    assert (out / "scores.csv").read_text() == "previous results\n"
    assert not (out / "heatmaps").exists()


def test_skip_bad_marks_rows_and_scores_the_rest(bad_inputs, tiny_checkpoint, tmp_path):
    args = [bad_inputs[k] for k in ("good", "zero", "truncated", "text", "empty", "missing")]
    result = _score(
        *args,
        "--model",
        tiny_checkpoint,
        "--out",
        tmp_path / "o",
        "--random-backbone",
        "--skip-bad",
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "o" / "scores.csv")
    assert (table.decision == "skipped").sum() == 5
    assert table.loc[table.decision != "skipped", "path"].tolist() == [str(bad_inputs["good"])]
    assert result.stderr.count("warning: skipped") == 5


def test_skip_bad_with_no_readable_image_fails_and_keeps_out(bad_inputs, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.csv").write_text("previous results\n")
    files = [bad_inputs[k] for k in ("zero", "truncated", "text")]
    args = ["--model", tiny_checkpoint, "--out", out, "--random-backbone", "--skip-bad"]
    result = _score(*files, *args, "--batch-size", "2")  # the bad images fill two batches
    assert result.exit_code == 2
    assert "none of the given paths holds a readable image" in result.stderr
    assert sorted(p.name for p in out.iterdir() if p.name != ".dzad.lock") == ["scores.csv"]
    assert (out / "scores.csv").read_text() == "previous results\n"


def test_bad_checkpoints_give_clear_errors(tiny_checkpoint, bad_inputs, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, corrupt)
    blob = corrupt / "extra.safetensors"
    blob.write_bytes(blob.read_bytes()[:100])
    for model in (corrupt, tmp_path / "no_such_model", bad_inputs["empty"]):
        result = _score(bad_inputs["good"], "--model", model, "--random-backbone")
        assert result.exit_code == 2
        assert Path(model).name in _error_line(result)


def test_missing_backbone_weights_stop_unless_random(monkeypatch, tiny_checkpoint, bad_inputs):
    def unavailable(name, random_weights=False):
        if not random_weights:
            raise BackboneUnavailable(f"{name}: ImageNet weights not available")
        from dzad.backbones import build_backbone

        return build_backbone(name, random_weights=True)

    monkeypatch.setattr("dzad.model.build_backbone", unavailable)
    result = _score(bad_inputs["good"], "--model", tiny_checkpoint)
    assert result.exit_code == 2
    assert "--random-backbone" in _error_line(result)


def test_evaluate_command(tiny_checkpoint, synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the checkpoint's relative sets.source must not resolve here
    out = tmp_path / "ev"
    base = ["evaluate", "--model", str(tiny_checkpoint), "--data", str(synth_root)]
    base += ["--categories", "grain", "--out", str(out), "--random-backbone", "--max-images", "4"]
    no_source = runner.invoke(app, base)
    assert no_source.exit_code == 2 and "--source" in _error_line(no_source)
    source = ["--source", str(synth_root), "--source-categories", "weave"]
    result = runner.invoke(app, [*base, *source, "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["counts"]["grain"]["images"] == 4
    assert "feature_knn" in metrics["controls"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    table = runner.invoke(app, [*base, "--no-controls"])
    assert table.exit_code == 0 and "image auroc" in table.stdout and "grain" in table.stdout
    assert json.loads((out / "metrics.json").read_text())["controls"] == {}
    missing = runner.invoke(app, [*base[:4], str(tmp_path / "nope"), *base[5:], "--no-controls"])
    assert missing.exit_code == 2 and "nope" in _error_line(missing)
