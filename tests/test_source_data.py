"""The one reading of SOURCE datasets (``dzad.data.source``): which images train, calibrate and fit
the controls, in which order, and the study's caches read as those datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dzad.config import DataConfig, DatasetRef, DZADConfig, SetsConfig
from dzad.data.source import source_labelled, source_normals
from dzad.errors import DZADInputError
from dzad.study.layout import source_cache_refs


def _img(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _dataset(root: Path) -> Path:
    """Two categories: ``b`` (2 normals, a defect with a mask, one without) and ``a`` (1 normal)."""
    _img(root / "b" / "train" / "good" / "0.png", 10)
    _img(root / "b" / "train" / "good" / "1.png", 20)
    _img(root / "b" / "test" / "good" / "0.png", 30)
    _img(root / "b" / "test" / "hole" / "0.png", 40)
    _img(root / "b" / "ground_truth" / "hole" / "0_mask.png", 255)
    _img(root / "b" / "test" / "hole" / "1.png", 50)  # no mask: still a labelled anomaly
    _img(root / "a" / "train" / "good" / "0.png", 60)
    return root


def test_normals_are_the_train_split_in_the_listed_order(tmp_path):
    root = _dataset(tmp_path / "d")
    other = _dataset(tmp_path / "e")
    refs = [DatasetRef(str(root), ("b", "a")), DatasetRef(str(other), ("a",))]
    normals = source_normals(refs)
    got = [(s.path.relative_to(tmp_path).parts[0], s.category, s.path.name) for s in normals]
    assert {s.label for s in normals} == {0}
    assert got == [
        ("d", "b", "0.png"),
        ("d", "b", "1.png"),
        ("d", "a", "0.png"),
        ("e", "a", "0.png"),
    ]
    every = source_normals([DatasetRef(str(root))])  # no categories listed: every one, sorted
    assert [s.category for s in every] == ["a", "b", "b"]


def test_no_normals_is_an_error_naming_the_dataset(tmp_path):
    root = tmp_path / "d"
    _img(root / "c" / "test" / "good" / "0.png", 10)
    with pytest.raises(DZADInputError, match=f"{root}: no SOURCE normal training images"):
        source_normals([DatasetRef(str(root), ("c",))])


def test_labelled_split_is_the_test_split_with_its_labels(tmp_path):
    root = _dataset(tmp_path / "d")
    images, labels = source_labelled([DatasetRef(str(root), ("b",))], 4, DataConfig())
    assert labels.tolist() == [0, 1, 1]
    assert [s.defect for s in images.samples] == ["good", "hole", "hole"]
    assert tuple(images[0]["image"].shape) == (3, 4, 4)
    # a file that is no image is dropped under data.skip_bad, and its label with it
    (root / "b" / "test" / "good" / "1.png").write_text("not an image")
    images, labels = source_labelled([DatasetRef(str(root), ("b",))], 4, DataConfig(skip_bad=True))
    assert len(images) == 3 and labels.tolist() == [0, 1, 1]
    with pytest.raises(DZADInputError, match="the labelled SOURCE split"):
        source_labelled([DatasetRef(str(root), ("a",))], 4, DataConfig())


def test_study_caches_are_read_with_their_sources_categories(tmp_path):
    sets = SetsConfig(source=(DatasetRef("raw/x", ("b", "a")), DatasetRef("raw/y")))
    cfg = DZADConfig(data=DataConfig(cache_dir=str(tmp_path)), sets=sets)
    assert source_cache_refs(cfg) == [
        DatasetRef(str(tmp_path / "source" / "0"), ("b", "a")),
        DatasetRef(str(tmp_path / "source" / "1"), ()),
    ]
