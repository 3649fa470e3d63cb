"""``dzad evaluate --normal DIR --abnormal DIR [--masks DIR]``: anomalib's Folder layout served by
the MVTec dataset code (:class:`dzad.data.test_sets.FolderSet`), same metrics, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dzad.cli import app
from dzad.data import test_sets
from dzad.data.test_sets import FolderSet
from dzad.errors import DZADInputError

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, synth_root) -> Path:
    """``grain``'s test split as plain folders: normal/, abnormal/ (defect-prefixed names) and
    masks/ (half named ``x.png``, half ``x_mask.png``)."""
    root = tmp_path_factory.mktemp("folders") / "grain_plain"
    cat = synth_root / "grain"
    shutil.copytree(cat / "test" / "good", root / "normal")
    (root / "abnormal").mkdir()
    (root / "masks").mkdir()
    defects = sorted(p for p in (cat / "test").iterdir() if p.name != "good")
    for k, image in enumerate(sorted(p for d in defects for p in d.iterdir())):
        name = f"{image.parent.name}_{image.name}"
        shutil.copy(image, root / "abnormal" / name)
        mask = cat / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
        stem = Path(name).stem
        shutil.copy(mask, root / "masks" / (f"{stem}.png" if k % 2 else f"{stem}_mask.png"))
    return root


def _evaluate(*args) -> tuple[object, dict]:
    base = ["evaluate", "--random-backbone", "--no-controls", "--json"]
    result = runner.invoke(app, [*base, *map(str, args)])
    return result, (json.loads(result.stdout) if result.exit_code == 0 else {})


def _error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


@pytest.mark.slow  # two evaluations; the folder mapping itself stays in the fast tests below
def test_folders_give_the_metrics_of_the_same_images_in_mvtec_layout(
    folders, synth_root, tiny_checkpoint, tmp_path
):
    model = ["-m", tiny_checkpoint]
    mvtec, want = _evaluate(
        *model, "--data", synth_root, "--categories", "grain", "--out", tmp_path / "a"
    )
    plain = ["--normal", folders / "normal", "--abnormal", folders / "abnormal"]
    result, got = _evaluate(*model, *plain, "--masks", folders / "masks", "--out", tmp_path / "b")
    assert mvtec.exit_code == 0 and result.exit_code == 0, result.output
    assert list(got["categories"]) == ["grain_plain"]  # the folders' parent names the category
    assert got["counts"]["grain_plain"] == want["counts"]["grain"]
    for metric, value in want["categories"]["grain"].items():
        assert got["categories"]["grain_plain"][metric] == pytest.approx(value, abs=1e-6), metric
    assert got["categories"]["grain_plain"]["pixel_auroc"] is not None  # masks were matched
    panels = sorted(
        p.relative_to(tmp_path / "b" / "panels") for p in (tmp_path / "b" / "panels").rglob("*.png")
    )
    assert panels[0].parts[0] == "abnormal" and panels[-1].parts[0] == "normal"


def test_without_masks_only_image_metrics(folders, tiny_checkpoint, tmp_path, monkeypatch):
    listed, list_files = [], test_sets.image_files
    monkeypatch.setattr(test_sets, "image_files", lambda d: listed.append(d) or list_files(d))
    plain = ["--normal", folders / "normal", "--abnormal", folders / "abnormal"]
    result, got = _evaluate("-m", tiny_checkpoint, *plain, "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    # listed once: the early check, the progress total and the evaluation share the listing
    assert listed.count(folders / "normal") == 1 and listed.count(folders / "abnormal") == 1
    metrics = got["categories"]["grain_plain"]
    assert metrics["image_auroc"] is not None and metrics["pixel_auroc"] is None
    assert "pixel_auroc" in got["skipped"]["metrics"]["grain_plain"]  # explained, not silent


def test_a_missing_mask_names_the_image(folders, tmp_path):
    masks = tmp_path / "masks"
    shutil.copytree(folders / "masks", masks)
    removed = sorted(masks.iterdir())[0]
    removed.unlink()
    image_stem = removed.stem.removesuffix("_mask")
    with pytest.raises(DZADInputError, match=f"{image_stem}.png: no mask in"):
        FolderSet(folders / "normal", folders / "abnormal", masks).samples()
    kept = FolderSet(folders / "normal", folders / "abnormal", masks).samples(skip_bad=True)
    assert len(kept) == len(FolderSet(folders / "normal", folders / "abnormal").samples()) - 1
    args = [
        "evaluate",
        "-m",
        "ckpt",
        "--normal",
        str(folders / "normal"),
        "--out",
        str(tmp_path / "o"),
    ]
    args += ["--abnormal", str(folders / "abnormal"), "--masks", str(masks)]
    result = runner.invoke(app, args)  # stops before the (absent) model loads
    assert image_stem in _error_line(result) and "no mask" in _error_line(result)


def test_bad_folder_options_are_refused(folders, tmp_path):
    plain = ["--normal", str(folders / "normal"), "--abnormal", str(folders / "abnormal")]
    base = ["evaluate", "-m", "ckpt", "--out", str(tmp_path / "o")]
    cases = [
        ([*plain, "--data", str(folders)], "not both"),
        (plain[:2], "--abnormal"),
        ([], "--data ROOT"),
        ([*plain, "--few-shot", "2"], "--few-shot"),
        ([*plain, "--categories", "a"], "--categories"),
    ]
    for extra, named in cases:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2 and named in result.output, (extra, result.output)
    missing = runner.invoke(app, [*base, *plain, "--masks", str(tmp_path / "nope")])
    assert "nope: is not a folder" in _error_line(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DZADInputError, match="no image files"):
        FolderSet(empty, folders / "abnormal").samples()
    assert not (tmp_path / "o").exists()
