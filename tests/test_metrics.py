"""dzad.metrics against scikit-learn, a hand-computed toy case and the slow sweep reference."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from benchmarks._reference import aupro_reference
from dzad.metrics import MetricAccumulator, image_metrics, macro_mean, pixel_metrics


def sklearn_f1max(y: np.ndarray, s: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def random_pixels(seed: int, n: int = 12, size: int = 24, levels: int = 40):
    """Masks with random blobs (some images defect-free), maps with ``levels`` distinct values."""
    rng = np.random.default_rng(seed)
    noise = rng.random((n, size, size)) < 0.04
    masks = ndimage.binary_dilation(noise, structure=np.ones((1, 3, 3)), iterations=1)
    masks[: n // 3] = False
    signal = ndimage.uniform_filter(masks.astype(float), size=(1, 3, 3))
    raw = rng.standard_normal((n, size, size)) + 2.0 * signal
    maps = np.digitize(raw, np.linspace(-2.5, 3.5, levels - 1)).astype(np.float32) / levels
    return masks, maps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.standard_normal(300) + 0.8 * y, 1)  # rounding creates many ties
    got = image_metrics(y, s)
    assert got["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert got["image_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert got["image_f1max"] == pytest.approx(sklearn_f1max(y, s), abs=1e-12)


def test_image_metrics_accept_torch_and_do_not_flip():
    y = torch.tensor([0, 0, 1, 1, 1])
    s = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.3])
    got = image_metrics(y, s)
    assert got["image_auroc"] == 0.0  # reported as it is, never flipped to 1.0
    assert image_metrics(y, -s)["image_auroc"] == 1.0


@pytest.mark.parametrize("seed", [3, 4])
def test_pixel_auroc_and_f1max_match_sklearn(seed):
    masks, maps = random_pixels(seed)
    got = pixel_metrics(masks, maps)
    y, s = masks.reshape(-1), maps.reshape(-1)
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-10)
    assert got["pixel_f1max"] == pytest.approx(sklearn_f1max(y, s), abs=1e-10)


def test_aupro_hand_computed_toy_case():
    # n=2 images of 1x4 px. Regions: A = pixels 0,1 of image 0 (size 2), B = pixel 3 of image 1.
    masks = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 1]]], dtype=bool)
    maps = np.array([[[0.9, 0.5, 0.5, 0.1]], [[0.3, 0.2, 0.5, 0.8]]], dtype=np.float32)
    # 5 normal pixels: 0.5, 0.1 | 0.3, 0.2, 0.5. Thresholds, (FPR, PRO = mean overlap of A, B):
    #   0.9 -> (0, (1/2 + 0)/2 = .25); 0.8 -> (0, (1/2 + 1)/2 = .75); 0.5 -> (2/5, 1) ...
    # The segment (0, .75)-(.4, 1) is cut at FPR .3: PRO .75 + .25 * .3/.4 = .9375.
    # Area = .3 * (.75 + .9375) / 2 = .253125; divided by .3 -> .84375.
    got = pixel_metrics(masks, maps)
    assert got["aupro"] == pytest.approx(0.84375, abs=1e-12)
    # AUROC: 0.9 and 0.8 beat all 5 normals; 0.5 beats 3 and ties 2 -> (5 + 5 + 4) / 15
    assert got["pixel_auroc"] == pytest.approx(14 / 15, abs=1e-12)
    # F1 at 0.9: 2/(1+0+3); at 0.8: 4/(2+0+3) = .8; at 0.5: 6/(3+2+3) -> max .8
    assert got["pixel_f1max"] == pytest.approx(0.8, abs=1e-12)
    assert aupro_reference(masks, maps) == pytest.approx(0.84375, abs=1e-12)


def test_aupro_regions_are_8_connected_per_image():
    # Defect pixels (0,0), (1,1), (1,2): one 8-connected region of 3 (4-connected: 2 regions).
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.zeros((1, 3, 3), dtype=np.float32)
    maps[0, 0, 0] = 1.0
    # curve (0,0) -> (0, 1/3) -> (1, 1): PRO at FPR .3 = 1/3 + 2/3 * .3 (4-conn would give 1/2)
    at_limit = 1 / 3 + 2 / 3 * 0.3
    assert pixel_metrics(masks, maps)["aupro"] == pytest.approx((1 / 3 + at_limit) / 2, abs=1e-12)
    # A second image whose one-pixel region touches the first image's region across the stack:
    # regions never join across images, so PRO = (1/3 + 0) / 2 (joined it would be 1/4).
    masks2 = np.concatenate([masks, np.zeros_like(masks)])
    masks2[1, 0, 0] = True
    maps2 = np.concatenate([maps, np.zeros_like(maps)])
    at_limit = 1 / 6 + 5 / 6 * 0.3
    assert pixel_metrics(masks2, maps2)["aupro"] == pytest.approx((1 / 6 + at_limit) / 2, abs=1e-12)
    assert aupro_reference(masks2, maps2) == pytest.approx((1 / 6 + at_limit) / 2, abs=1e-12)


@pytest.mark.parametrize(("seed", "limit"), [(5, 0.3), (6, 0.3), (7, 0.1)])
def test_aupro_matches_threshold_sweep_reference(seed, limit):
    masks, maps = random_pixels(seed, n=16, size=32, levels=60)
    got = pixel_metrics(masks, maps, fpr_limit=limit)["aupro"]
    assert 0.0 < got < 1.0
    assert got == pytest.approx(aupro_reference(masks, maps, fpr_limit=limit), abs=1e-4)


def test_metrics_invariant_to_monotone_transforms():
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 64, 200) / 64.0
    masks, maps = random_pixels(9)
    base_i, base_p = image_metrics(y, s), pixel_metrics(masks, maps)
    for f in (np.exp, lambda x: x**3 + 5):
        assert image_metrics(y, f(s)) == pytest.approx(base_i, abs=1e-12)
        assert pixel_metrics(masks, f(maps.astype(np.float64))) == pytest.approx(base_p, abs=1e-9)


def test_single_class_gives_nan_with_logged_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="dzad.metrics"):
        got = image_metrics(np.ones(5, dtype=int), np.arange(5.0))
    assert all(math.isnan(v) for v in got.values()) and len(got) == 3
    assert "one class only" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dzad.metrics"):
        got = pixel_metrics(np.zeros((2, 4, 4), bool), np.random.rand(2, 4, 4))
    assert set(got) == {"pixel_auroc", "pixel_f1max", "aupro"}
    assert all(math.isnan(v) for v in got.values())
    assert "pixels are normal" in caplog.text


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        image_metrics([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="differ"):
        image_metrics([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        image_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="must both be"):
        pixel_metrics(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5)))


def test_accumulator_streams_to_the_same_result():
    masks, maps = random_pixels(10)
    labels = masks.reshape(len(masks), -1).any(1).astype(int)
    scores = maps.reshape(len(maps), -1).max(1)
    acc = MetricAccumulator()
    for i in range(0, len(labels), 5):  # batches of (B,1,H,W) torch tensors
        acc.add(
            torch.from_numpy(labels[i : i + 5]),
            torch.from_numpy(scores[i : i + 5]),
            torch.from_numpy(masks[i : i + 5, None]),
            torch.from_numpy(maps[i : i + 5, None]),
        )
    assert len(acc) == len(labels)
    expected = {**image_metrics(labels, scores), **pixel_metrics(masks, maps)}
    assert acc.result() == pytest.approx(expected, abs=1e-12)
    assert acc.result() == pytest.approx(expected, abs=1e-12)  # idempotent
    with pytest.raises(ValueError, match="every batch or for none"):
        acc.add([0], [0.5])


def test_accumulator_image_only():
    acc = MetricAccumulator()
    acc.add([0, 1], [0.1, 0.9])
    acc.add([0, 1], [0.5, 0.3])  # positives .9, .3 vs negatives .1, .5
    assert acc.result() == pytest.approx(
        {"image_auroc": 0.75, "image_ap": 5 / 6, "image_f1max": 0.8}, abs=1e-12
    )
    with pytest.raises(ValueError, match="before any add"):
        MetricAccumulator().result()


def test_macro_mean_ignores_nan_and_says_which():
    per = {
        "a": {"image_auroc": 0.8, "aupro": math.nan},
        "b": {"image_auroc": 0.6, "aupro": 0.5},
        "c": {"image_auroc": math.nan, "aupro": math.nan},
    }
    got = macro_mean(per)
    assert got["image_auroc"] == pytest.approx(0.7)
    assert got["aupro"] == pytest.approx(0.5)
    assert got["skipped"] == {"image_auroc": ["c"], "aupro": ["a", "c"]}
    assert math.isnan(macro_mean({"a": {"x": math.nan}})["x"])
