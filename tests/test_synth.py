"""Synthetic generator: layout, determinism, exact masks, varied normals, no brightness giveaway."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from dzad.cli import app
from dzad.data.dataset import collect_samples, iter_samples, list_categories
from dzad.data.synth import DEFECTS, FAMILIES, generate, render_sample

SMALL = {"size": 32, "n_train": 3, "n_test_good": 2, "n_test_defect": 5}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_layout_and_labels(tmp_path):
    written = generate(tmp_path, seed=0, **SMALL)
    assert written == {f: list(c) for f, c in FAMILIES.items()}
    assert not set(FAMILIES["textures"]) & set(FAMILIES["objects"])  # families share no category
    for family, cats in FAMILIES.items():
        root = tmp_path / family
        assert list_categories(root) == sorted(cats)
        for cat in cats:
            train = list(iter_samples(root, cat, "train", validate=True))
            test = list(iter_samples(root, cat, "test", validate=True))
            assert len(train) == 3 and all(s.label == 0 for s in train)
            assert sum(s.label == 0 for s in test) == 2
            defects = [s.defect for s in test if s.label == 1]
            assert sorted(defects) == sorted(
                DEFECTS[family][i % len(DEFECTS[family])] for i in range(5)
            )
            for s in test:
                if s.label:
                    mask = np.asarray(Image.open(s.mask_path))
                    assert mask.shape == (32, 32) and set(np.unique(mask)) == {0, 255}
            assert Image.open(train[0].path).size == (32, 32)


def test_deterministic_bytes(tmp_path):
    generate(tmp_path / "a", seed=7, **SMALL)
    generate(tmp_path / "b", seed=7, **SMALL)
    generate(tmp_path / "c", seed=8, **SMALL)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a != c
    # image i depends only on (seed, family, category, split, i): more images leave these unchanged
    generate(tmp_path / "d", seed=7, families=("objects",), **{**SMALL, "n_train": 5})
    d = _files(tmp_path / "d")
    assert d["objects/nut/train/good/002.png"] == a["objects/nut/train/good/002.png"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_masks_are_exactly_the_changed_pixels(family):
    for cat in FAMILIES[family]:
        for k, defect in enumerate(DEFECTS[family]):
            rng = np.random.default_rng([3, k])
            clean, image, mask = render_sample(family, cat, 48, rng, defect)
            assert mask.dtype == bool and mask.shape == (48, 48)
            assert np.array_equal(mask, (image != clean).any(-1))
            assert 6 <= mask.sum() < 0.2 * 48 * 48, (cat, defect, mask.sum())
            # the clean twin is the normal image the same draw would give
            again, same, none = render_sample(family, cat, 48, np.random.default_rng([3, k]))
            assert np.array_equal(again, clean) and np.array_equal(same, clean) and not none.any()


def test_normals_vary_and_brightness_is_no_giveaway(tmp_path):
    generate(tmp_path, seed=1, size=40, n_train=4, n_test_good=24, n_test_defect=24)
    for family in FAMILIES:
        samples = collect_samples(tmp_path / family, splits=("test",))
        means, labels = [], []
        for s in samples:
            means.append(np.asarray(Image.open(s.path), np.float32).mean())
            labels.append(s.label)
        auroc = roc_auc_score(labels, means)
        assert 0.3 < auroc < 0.7, (family, auroc)
        train = [np.asarray(Image.open(s.path), np.float32) for s in samples if s.label == 0]
        diffs = [np.abs(train[i] - train[i + 1]).mean() for i in range(len(train) - 1)]
        assert min(diffs) > 2.0  # no two consecutive normal images are near-copies


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic families"):
        generate(tmp_path, families=("liquids",))
    with pytest.raises(ValueError):
        generate(tmp_path, size=8)
    with pytest.raises(ValueError):
        generate(tmp_path, n_train=-1)


def test_cli_synth(tmp_path):
    result = CliRunner().invoke(
        app,
        ["synth", "--dest", str(tmp_path), "--seed", "2", "--size", "32", "--n-train", "1",
         "--n-test-good", "1", "--n-test-defect", "2", "--family", "objects"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "washer" in result.output
    assert list_categories(tmp_path / "objects") == sorted(FAMILIES["objects"])
    assert not (tmp_path / "textures").exists()
    bad = CliRunner().invoke(app, ["synth", "--dest", str(tmp_path), "--family", "liquids"])
    assert bad.exit_code == 2
