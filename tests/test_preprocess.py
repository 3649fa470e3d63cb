"""Preprocess cache: resized images and masks, manifest, no work on unchanged input, bad files."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import dzad.data.preprocess as pp
from dzad.cli import app
from dzad.config import DataConfig
from dzad.data.dataset import ImageDataset, collect_samples, list_categories
from dzad.data.images import load_image
from dzad.errors import DZADInputError

SHARED = Path(__file__).parents[1].parent / "shared" / "datasets"
RNG = np.random.default_rng(0)


def _save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Mixed formats and sizes: RGB PNG, grey JPEG, 16-bit PNG, a defect with its mask."""
    r = tmp_path / "data"
    _save(r / "a/train/good/0.png", RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    _save(r / "a/train/good/1.jpg", RNG.integers(0, 256, (50, 50), dtype=np.uint8), quality=90)
    _save(r / "a/test/good/0.png", RNG.integers(0, 65536, (20, 24)).astype(np.uint16))
    _save(r / "a/test/scratch/0.png", RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    mask = np.zeros((30, 40), np.uint8)
    mask[5:15, 10:30] = 200
    _save(r / "a/ground_truth/scratch/0_mask.png", mask)
    _save(r / "b/test/good/x.bmp", RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    return r


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_cache_and_manifest(root, tmp_path):
    out = tmp_path / "cache"
    table = pp.preprocess(root, [], out, 16, "bicubic", 127)
    assert list(table.columns) == pp.COLUMNS and len(table) == 5
    row = table[table.defect == "scratch"].iloc[0]
    assert (row.label, row.split, row.orig_w, row.orig_h) == (1, "test", 40, 30)
    assert (row.path, row.mask_path) == (
        "a/test/scratch/0.png",
        "a/ground_truth/scratch/0_mask.png",
    )
    assert row.cached_mask_path == "a/ground_truth/scratch/0_mask.png"
    mask = np.asarray(Image.open(out / row.cached_mask_path))
    assert mask.shape == (16, 16) and set(np.unique(mask)) == {0, 255}
    assert 0.1 < (mask > 0).mean() < 0.3  # 10x20 of 30x40 at 200 > 127
    for r in table.itertuples():
        assert Image.open(out / r.cached_path).size == (16, 16)
    good = table[table.mask_path == ""]
    assert (good.label == 0).all() and (good.cached_mask_path == "").all()
    assert pp.load_manifest(out).equals(table)
    # the cache is an MVTec root itself, and the cached pixels are the reader's at that size
    assert list_categories(out) == ["a", "b"] and len(collect_samples(out)) == 5
    ds = ImageDataset(pp.cached_samples(out), 16, DataConfig())
    first = next(
        i for i, s in enumerate(ds.samples) if s.path.name == "0.png" and s.split == "train"
    )
    reference = load_image(root / "a/train/good/0.png", 16, "bicubic")
    assert (ds[first]["image"] - reference).abs().max() <= 0.5 / 255 + 1e-6
    defect = next(i for i, s in enumerate(ds.samples) if s.label == 1)
    assert torch.equal(ds[defect]["mask"][0], torch.from_numpy(mask > 0).float())


def test_rerun_does_no_work(root, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    first = pp.preprocess(root, ["a"], out, 12)
    before = _mtimes(out)

    def forbidden(*args, **kwargs):
        raise AssertionError("an unchanged re-run must not load any image")

    monkeypatch.setattr(pp, "load_image", forbidden)
    again = pp.preprocess(root, ["a"], out, 12)
    assert again.equals(first) and _mtimes(out) == before
    changed = root / "a/train/good/0.png"
    os.utime(changed, ns=(1, 1))  # a new modification time only: the same content
    assert pp.preprocess(root, ["a"], out, 12).equals(first) and _mtimes(out) == before
    monkeypatch.undo()
    _save(changed, RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    pp.preprocess(root, ["a"], out, 12)
    assert _mtimes(out)[str(out / pp.MANIFEST)] != before[str(out / pp.MANIFEST)]
    pp.preprocess(root, ["a"], out, 8)  # other parameters: rebuilt at the new size
    assert Image.open(out / "a/train/good/0.png").size == (8, 8)


def test_bad_files(root, tmp_path, caplog):
    full = root / "a/train/good/0.png"
    full.write_bytes(full.read_bytes()[:-200])  # header intact, pixel data cut
    (root / "a/test/good/0.png").write_bytes(b"")
    out = tmp_path / "cache"
    with pytest.raises(DZADInputError) as err:
        pp.preprocess(root, ["a"], out, 12)
    assert err.value.path == root / "a/test/good/0.png" and not out.exists()
    (root / "a/test/good/0.png").unlink()
    with pytest.raises(DZADInputError, match="truncated") as err:
        pp.preprocess(root, ["a"], out, 12)
    assert err.value.path == full and not out.exists()
    with caplog.at_level(logging.WARNING):
        table = pp.preprocess(root, ["a"], out, 12, skip_bad=True)
    assert len(table) == 2 and "a/train/good/0.png" not in set(table.path)
    assert str(full) in caplog.text


def test_cache_files_do_not_depend_on_location(root, tmp_path, monkeypatch):
    """The same images at two absolute locations, copied at different times (other mtimes), and
    read through an absolute and a relative root: byte-identical manifest and fingerprint."""
    here, there = tmp_path / "one" / "data", tmp_path / "two" / "deeper" / "data"
    shutil.copytree(root, here, copy_function=shutil.copyfile)
    shutil.copytree(root, there, copy_function=shutil.copyfile)
    for i, p in enumerate(sorted(there.rglob("*.*"))):
        os.utime(p, ns=(i + 1, i + 1))
    first = pp.preprocess(here, [], tmp_path / "one" / "cache", 12)
    monkeypatch.chdir(there.parent)
    second = pp.preprocess(Path("data"), [], Path("cache"), 12)
    assert first.equals(second)
    for name in (pp.MANIFEST, pp.FINGERPRINT):
        written = (tmp_path / "one" / "cache" / name).read_bytes()
        assert written == (there.parent / "cache" / name).read_bytes()
        assert str(tmp_path).encode() not in written


def test_refuses_foreign_folder(root, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("keep me")
    with pytest.raises(DZADInputError, match="not a preprocess cache"):
        pp.preprocess(root, [], busy, 8)
    assert (busy / "thesis.tex").read_text() == "keep me"


def test_cli_preprocess(root, tmp_path):
    out = tmp_path / "c"
    args = [
        "preprocess",
        "--data",
        str(root),
        "--out",
        str(out),
        "--categories",
        "b",
        "--size",
        "8",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 images" in result.output and pp.load_manifest(out).category.tolist() == ["b"]
    bad = CliRunner().invoke(
        app, ["preprocess", "--data", str(tmp_path / "none"), "--out", str(out)]
    )
    assert bad.exit_code == 2 and "error:" in bad.output


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/datasets is absent")
def test_shared_glass(tmp_path):
    table = pp.preprocess(SHARED, ["glass"], tmp_path / "c", 32)
    assert len(table) == 98 and table.label.sum() == 80 and (table.split == "test").all()
    assert set(zip(table.orig_w, table.orig_h, strict=True)) == {(256, 256)}
