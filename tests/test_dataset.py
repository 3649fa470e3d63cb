"""MVTec-layout reader: samples, labels, masks, every kind of bad input, and the real dev sets."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dzad.config import DataConfig
from dzad.data.dataset import (
    ImageDataset,
    Sample,
    check_sample,
    collect_samples,
    iter_samples,
    list_categories,
)
from dzad.data.images import load_mask
from dzad.data.test_sets import FolderSet, MVTecRoot, as_test_set
from dzad.errors import DZADInputError

SHARED = Path(__file__).parents[1].parent / "shared" / "datasets"


def _img(path: Path, h: int = 20, w: int = 24, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return path


def _mask(path: Path, h: int = 20, w: int = 24, box=(2, 8, 3, 9)) -> Path:
    arr = np.zeros((h, w), np.uint8)
    arr[box[0] : box[1], box[2] : box[3]] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Category ``a`` (train + test, two defect types) and test-only category ``b``."""
    r = tmp_path / "data"
    for i in range(3):
        _img(r / f"a/train/good/{i:03d}.png")
    _img(r / "a/test/good/000.png")
    _img(r / "a/test/crack/000.jpg")
    _mask(r / "a/ground_truth/crack/000_mask.png")
    _img(r / "a/test/crack/001.bmp")
    _mask(r / "a/ground_truth/crack/001_mask.png", box=(0, 0, 0, 0))  # empty mask: still label 1
    _img(r / "a/test/hole/000.png")
    _mask(r / "a/ground_truth/hole/000_mask.bmp")  # non-PNG mask suffix is accepted
    _img(r / "b/test/good/x.png")
    _img(r / "b/test/dent/y.png")
    _mask(r / "b/ground_truth/dent/y_mask.png")
    (r / "notes").mkdir()  # a folder without train/test is not a category
    (r / "a/train/good/readme.txt").write_text("ignored")
    return r


def test_categories_and_samples(root):
    assert list_categories(root) == ["a", "b"]
    train = list(iter_samples(root, "a", "train"))
    assert [s.path.name for s in train] == ["000.png", "001.png", "002.png"]
    assert all(s.label == 0 and s.defect == "good" and s.mask_path is None for s in train)
    test = list(iter_samples(root, "a", "test"))
    assert [(s.defect, s.label, s.path.name) for s in test] == [
        ("crack", 1, "000.jpg"),
        ("crack", 1, "001.bmp"),
        ("good", 0, "000.png"),
        ("hole", 1, "000.png"),
    ]
    assert test[0].mask_path == root / "a/ground_truth/crack/000_mask.png"
    assert test[3].mask_path == root / "a/ground_truth/hole/000_mask.bmp"
    assert list(iter_samples(root, "b", "train")) == []  # test-only category is valid
    assert len(collect_samples(root)) == 3 + 4 + 2


def test_dataset_items(root):
    samples = list(iter_samples(root, "a", "test"))
    ds = ImageDataset(samples, 10, DataConfig())
    item = ds[0]
    assert item["image"].shape == (3, 10, 10) and item["mask"].shape == (1, 10, 10)
    assert item["label"] == 1 and item["category"] == "a" and item["defect"] == "crack"
    assert item["path"] == str(samples[0].path)
    assert torch.allclose(item["image"], torch.full((3, 10, 10), 100 / 255))
    assert 0 < item["mask"].sum() < 100 and set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert ds[1]["mask"].sum() == 0 and ds[1]["label"] == 1  # empty mask keeps its label
    assert ds[2]["mask"].sum() == 0 and ds[2]["label"] == 0
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 10, 10) and batch["label"].tolist() == [1, 1, 0, 1]


def test_defect_without_mask(root, caplog):
    (root / "a/ground_truth/hole/000_mask.bmp").unlink()
    with pytest.raises(DZADInputError, match="no mask") as err:
        list(iter_samples(root, "a", "test"))
    assert err.value.path == root / "a/test/hole/000.png"
    with caplog.at_level(logging.WARNING):
        kept = list(iter_samples(root, "a", "test", skip_bad=True))
    assert [s.defect for s in kept] == ["crack", "crack", "good"]
    assert "000.png" in caplog.text and "no mask" in caplog.text
    # allow_missing_masks keeps the image, labelled defect, with no mask (image metrics only)
    kept = list(iter_samples(root, "a", "test", allow_missing_masks=True))
    assert [(s.defect, s.label) for s in kept] == [
        ("crack", 1),
        ("crack", 1),
        ("good", 0),
        ("hole", 1),
    ]
    assert kept[3].mask_path is None and kept[0].mask_path is not None
    both = collect_samples(root, ["a", "b"], ("test",), allow_missing_masks=True)
    assert [s.path.name for s in both] == [
        "000.jpg",
        "001.bmp",
        "000.png",
        "000.png",
        "y.png",
        "x.png",
    ]
    item = ImageDataset(kept, 8, DataConfig())[3]
    assert item["label"] == 1 and item["mask"].sum() == 0


def test_a_root_and_plain_folders_are_one_test_set_interface(root, tmp_path):
    """MVTecRoot: a category's test split, maskless defects kept; FolderSet: its one category;
    each lists a category once (a file added later is not seen by the same test set)."""
    (root / "a/ground_truth/hole/000_mask.bmp").unlink()
    data = as_test_set(str(root))
    assert isinstance(data, MVTecRoot) and data.root == root and str(data) == str(root)
    assert as_test_set(data) is data
    assert data.categories() == ["a", "b"] and data.categories(["b"]) == ["b"]
    want = list(iter_samples(root, "a", "test", allow_missing_masks=True))
    assert data.samples("a") == want and want[-1].mask_path is None
    _img(root / "a/test/good/001.png")
    assert data.samples("a") == want  # listed once
    assert len(MVTecRoot(root).samples("a")) == len(want) + 1
    with pytest.raises(DZADInputError, match="dataset root is not a folder"):
        MVTecRoot(tmp_path / "nope").categories(["a"])
    folders = FolderSet(root / "b/test/good", root / "b/test/dent")
    assert folders.categories() == ["test"] == folders.categories(["test"])
    assert [s.label for s in folders.samples("test")] == [0, 1]
    with pytest.raises(ValueError, match="one category"):
        folders.categories(["a"])


def test_mask_size_mismatch(root, caplog):
    _mask(root / "a/ground_truth/crack/000_mask.png", h=21)
    bad = root / "a/ground_truth/crack/000_mask.png"
    with pytest.raises(DZADInputError, match="differs") as err:
        list(iter_samples(root, "a", "test", validate=True))
    assert err.value.path == bad
    samples = list(iter_samples(root, "a", "test"))  # without validate: caught when loading
    with pytest.raises(DZADInputError, match="differs"):
        ImageDataset(samples, 8, DataConfig())[0]
    with caplog.at_level(logging.WARNING):
        ds = ImageDataset(samples, 8, DataConfig(skip_bad=True))
    assert len(ds) == 3 and str(bad) in caplog.text


def test_unreadable_file(root):
    (root / "a/train/good/001.png").write_bytes(b"")
    with pytest.raises(DZADInputError, match="empty file"):
        list(iter_samples(root, "a", "train", validate=True))
    kept = list(iter_samples(root, "a", "train", validate=True, skip_bad=True))
    assert [s.path.name for s in kept] == ["000.png", "002.png"]
    with pytest.raises(DZADInputError):
        check_sample(Sample(root / "a/train/good/001.png", "a", "train", 0, "good", None))


def test_empty_category_and_bad_layout(root, caplog):
    (root / "c/train/good").mkdir(parents=True)
    assert "c" in list_categories(root)
    with pytest.raises(DZADInputError, match="empty category"):
        list(iter_samples(root, "c", "train"))
    with caplog.at_level(logging.WARNING):
        assert list(iter_samples(root, "c", "test", skip_bad=True)) == []
    assert "empty category" in caplog.text
    with pytest.raises(DZADInputError, match="does not exist"):
        list(iter_samples(root, "zzz", "test"))
    _img(root / "a/train/crack/000.png")
    with pytest.raises(DZADInputError, match="only hold good"):
        list(iter_samples(root, "a", "train"))
    with pytest.raises(ValueError):
        list(iter_samples(root, "a", "val"))
    with pytest.raises(DZADInputError):
        list_categories(root / "notes")


# Expected counts: ../shared/datasets/README.md.
SHARED_COUNTS = {
    "glass": (0, 98, 80),
    "magnetic_tile": (761, 583, 392),
    "mpdd_metal_plate": (54, 107, 81),
}


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/datasets is absent")
def test_shared_datasets_as_they_are():
    assert list_categories(SHARED) == sorted(SHARED_COUNTS)
    for cat, (n_train, n_test, n_defect) in SHARED_COUNTS.items():
        train = list(iter_samples(SHARED, cat, "train", validate=True))
        test = list(iter_samples(SHARED, cat, "test", validate=True))
        assert (len(train), len(test), sum(s.label for s in test)) == (n_train, n_test, n_defect)
    uneven = [s for s in iter_samples(SHARED, "magnetic_tile", "test") if s.defect == "uneven"]
    empty = [s.label for s in uneven if load_mask(s.mask_path).sum() == 0]  # native size
    assert empty == [1, 1, 1, 1]  # the README's 4 empty "uneven" masks keep label 1
    for cat in SHARED_COUNTS:  # one of each kind of file loads at a fixed size
        sample = next(s for s in iter_samples(SHARED, cat, "test") if s.label == 1)
        item = ImageDataset([sample], 32, DataConfig())[0]
        assert item["image"].shape == (3, 32, 32) and item["mask"].sum() > 0
