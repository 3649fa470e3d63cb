"""VisA and BTAD converters on tiny fake releases: layout, binarised masks, counts, split hash."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dzad.cli import app
from dzad.data.convert import (
    BTAD_COUNTS,
    VISA_COUNTS,
    SplitCounts,
    convert_btad,
    convert_visa,
    split_digest,
)
from dzad.data.dataset import collect_samples, list_categories
from dzad.errors import DZADInputError

RNG = np.random.default_rng(0)


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _image(path: Path, h: int = 16, w: int = 20) -> Path:
    return _save(path, RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _label_mask(path: Path, h: int = 16, w: int = 20) -> Path:
    arr = np.zeros((h, w), np.uint8)
    arr[2:5, 3:7] = 1  # VisA masks hold small region ids
    arr[9:12, 10:14] = 2
    return _save(path, arr)


def make_visa(root: Path) -> Path:
    """Two objects; ``candle``: 3 train, 1 test normal, 2 anomalies; ``pcb1``: 2, 1, 1."""
    rows = []
    for obj, (n_train, n_good, n_bad) in {"candle": (3, 1, 2), "pcb1": (2, 1, 1)}.items():
        for i in range(n_train + n_good):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _image(root / rel)
            rows.append([obj, "train" if i < n_train else "test", "normal", rel, ""])
        for i in range(n_bad):
            rel, mrel = (
                f"{obj}/Data/Images/Anomaly/{i:03d}.JPG",
                f"{obj}/Data/Masks/Anomaly/{i:03d}.png",
            )
            _image(root / rel)
            _label_mask(root / mrel)
            rows.append([obj, "test", "anomaly", rel, mrel])
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv/1cls.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["object", "split", "label", "image", "mask"], *rows])
    return root


VISA_SMALL = {"candle": SplitCounts(3, 1, 2), "pcb1": SplitCounts(2, 1, 1)}


def test_visa(tmp_path):
    src = make_visa(tmp_path / "VisA")
    result = convert_visa(src, tmp_path / "out", VISA_SMALL)
    out = tmp_path / "out"
    assert result.counts == VISA_SMALL and list_categories(out) == ["candle", "pcb1"]
    assert (out / "candle/train/good/0000.JPG").read_bytes() == (
        src / "candle/Data/Images/Normal/0000.JPG"
    ).read_bytes()
    assert (out / "candle/test/good/0003.JPG").is_file()
    mask = np.asarray(Image.open(out / "candle/ground_truth/bad/001_mask.png"))
    expected = np.asarray(Image.open(src / "candle/Data/Masks/Anomaly/001.png")) > 0
    assert set(np.unique(mask)) == {0, 255} and np.array_equal(mask > 0, expected)
    samples = collect_samples(out)
    assert sum(s.label for s in samples) == 3 and {s.defect for s in samples} == {"good", "bad"}
    assert result.split_sha256 == split_digest(out)[1]
    assert json.loads((out / "convert.json").read_text())["split_sha256"] == result.split_sha256
    # same input -> same hash (re-converting replaces the first); another split -> other hash
    again = convert_visa(src, tmp_path / "out", VISA_SMALL)
    assert again.split_sha256 == result.split_sha256
    table = (
        (src / "split_csv/1cls.csv")
        .read_text()
        .replace("candle,test,normal", "candle,train,normal")
    )
    (src / "split_csv/1cls.csv").write_text(table)
    moved = convert_visa(src, tmp_path / "out2", None)
    assert (
        moved.counts["candle"] == SplitCounts(4, 0, 2) and moved.split_sha256 != result.split_sha256
    )


def test_visa_count_check(tmp_path):
    src = make_visa(tmp_path / "VisA")
    with pytest.raises(DZADInputError, match="no-check-counts") as err:
        convert_visa(src, tmp_path / "out")  # default: the official counts
    assert "candle" in str(err.value) and not (tmp_path / "out").exists()
    wrong = {**VISA_SMALL, "pcb1": SplitCounts(2, 1, 2)}
    with pytest.raises(DZADInputError, match="pcb1"):
        convert_visa(src, tmp_path / "out", wrong)
    assert sum(c.test_defect for c in VISA_COUNTS.values()) == 1200  # VisA README totals
    assert sum(c.train_good + c.test_good for c in VISA_COUNTS.values()) == 9621


def test_visa_bad_input(tmp_path):
    src = make_visa(tmp_path / "VisA")
    _label_mask(src / "pcb1/Data/Masks/Anomaly/000.png", h=15)
    with pytest.raises(DZADInputError, match="mask size") as err:
        convert_visa(src, tmp_path / "out", None)
    assert err.value.path == src / "pcb1/Data/Masks/Anomaly/000.png"
    (src / "candle/Data/Images/Normal/0001.JPG").unlink()
    with pytest.raises(DZADInputError, match="missing") as err:
        convert_visa(src, tmp_path / "out", None)
    assert err.value.path == src / "candle/Data/Images/Normal/0001.JPG"
    (src / "split_csv/1cls.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DZADInputError, match="columns"):
        convert_visa(src, tmp_path / "out", None)
    assert not (tmp_path / "out").exists()


def make_btad(root: Path) -> Path:
    """``01``: bmp images, png masks; ``02``: png images, bmp masks; ``03``: jpg image and mask."""
    for cat, (img_ext, mask_ext) in {"01": (".bmp", ".png"), "02": (".png", ".bmp")}.items():
        for i in range(3):
            _image(root / f"{cat}/train/ok/{i:04d}{img_ext}")
        _image(root / f"{cat}/test/ok/{0:04d}{img_ext}")
        for i in range(2):
            _image(root / f"{cat}/test/ko/{i:04d}{img_ext}")
            arr = np.zeros((16, 20), np.uint8)
            arr[4 + i : 9, 5:12] = 255
            _save(root / f"{cat}/ground_truth/ko/{i:04d}{mask_ext}", arr)
    _image(root / "03/train/ok/a.jpg")
    _image(root / "03/test/ko/b.jpg")
    noisy = np.where(np.arange(20)[None, :] < 10, 3, 250).repeat(16, 0).astype(np.uint8)
    _save(root / "03/ground_truth/ko/b.jpg", noisy)  # JPEG mask: near-0 noise must stay 0
    return root


def test_btad(tmp_path):
    src = make_btad(tmp_path / "BTech_Dataset_transformed")
    small = {"01": SplitCounts(3, 1, 2), "02": SplitCounts(3, 1, 2), "03": SplitCounts(1, 0, 1)}
    result = convert_btad(tmp_path, tmp_path / "out", small)  # the archive's top folder is found
    out = tmp_path / "out"
    assert result.counts == small
    assert (out / "01/train/good/0000.bmp").is_file() and (out / "02/test/ko/0001.png").is_file()
    m = np.asarray(Image.open(out / "02/ground_truth/ko/0001_mask.png"))
    assert set(np.unique(m)) == {0, 255} and (m > 0).sum() == 4 * 7
    jm = np.asarray(Image.open(out / "03/ground_truth/ko/b_mask.png")) > 0
    assert jm[:, :8].sum() == 0 and jm[:, 12:].all()
    assert {s.defect for s in collect_samples(out)} == {"good", "ko"}
    with pytest.raises(DZADInputError, match="01: expected"):
        convert_btad(src, tmp_path / "out3")  # official counts differ from the fixture
    assert BTAD_COUNTS["03"].train_good == 1000


def test_btad_bad_input(tmp_path):
    src = make_btad(tmp_path / "bt")
    (src / "01/ground_truth/ko/0001.png").unlink()
    with pytest.raises(DZADInputError, match="no mask") as err:
        convert_btad(src, tmp_path / "out", None)
    assert err.value.path == src / "01/test/ko/0001.bmp"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/keep.txt").write_text("mine")
    with pytest.raises(DZADInputError, match="not empty"):
        convert_btad(src, tmp_path / "busy", None)
    assert (tmp_path / "busy/keep.txt").read_text() == "mine"
    with pytest.raises(DZADInputError, match="expected dataset"):
        convert_btad(tmp_path / "busy", tmp_path / "out", None)


def test_cli_convert(tmp_path):
    src = make_btad(tmp_path / "bt")
    runner = CliRunner()
    ok = runner.invoke(app, ["convert", "btad", str(src), str(tmp_path / "o"), "--no-check-counts"])
    assert ok.exit_code == 0, ok.output
    assert "split sha256: " + split_digest(tmp_path / "o")[1] in ok.output
    bad = runner.invoke(app, ["convert", "btad", str(src), str(tmp_path / "p")])
    assert bad.exit_code == 2 and "error:" in bad.output and "no-check-counts" in bad.output
