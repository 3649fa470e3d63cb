"""Evaluation protocol: metrics.json equals an independent recomputation from its own outputs."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from dzad.config import DatasetRef
from dzad.data.dataset import ImageDataset, iter_samples
from dzad.decisions import map_threshold
from dzad.evaluation import build_controls, evaluate, source_batches
from dzad.model import DZAD
from dzad.scoring import rank_fusion
from dzad.weighting import weighted_score

CATS = ["grain", "weave"]


def _f1max(labels: np.ndarray, scores: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(labels, scores)
    return float(np.max(2 * p * r / np.clip(p + r, 1e-12, None)))


def _aupro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """Reference AUPRO: PRO and FPR after each distinct threshold, trapezoid area to FPR 0.3."""
    regions, n = ndimage.label(masks, structure=_structure())
    values = maps.ravel()
    region = regions.ravel()
    order = np.argsort(-values, kind="stable")
    v = values[order]
    neg = np.cumsum(region[order] == 0) / (region == 0).sum()
    overlap = np.zeros(v.size)
    for k in range(1, n + 1):
        inside = region[order] == k
        overlap += np.cumsum(inside) / inside.sum()
    pro = overlap / n
    last = np.r_[np.flatnonzero(v[1:] != v[:-1]), v.size - 1]  # end of each group of ties
    x = np.r_[0.0, neg[last], 1.0]
    y = np.r_[0.0, pro[last], 1.0]
    keep = x <= limit
    xs, ys = np.r_[x[keep], limit], np.r_[y[keep], np.interp(limit, x, y)]
    return float(np.trapezoid(ys, xs) / limit)


def _structure() -> np.ndarray:
    s = np.zeros((3, 3, 3), bool)
    s[1] = True  # 8-connectivity inside an image, never across images
    return s


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model, synth_root):
    out = tmp_path_factory.mktemp("eval") / "run"
    cfg = replace(tiny_model.cfg.evaluate, batch_size=4)
    refs = [DatasetRef(str(synth_root), ("weave",))]

    def src():
        return source_batches(refs, tiny_model.image_size, tiny_model.cfg.data, 8)

    controls = build_controls(tiny_model, cfg, src)
    result = evaluate(tiny_model, synth_root, CATS, out, cfg, controls, save_maps=True)
    return out, result


def test_metrics_json_equals_recomputation_from_scores_and_maps(evaluated, tiny_model, synth_root):
    out, result = evaluated
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    scores = pd.read_csv(out / "scores.csv")
    size = tiny_model.image_size
    for cat in CATS:
        rows = scores[scores.category == cat]
        y, s = rows.label.to_numpy(), rows.image_score.to_numpy()
        got = saved["categories"][cat]
        assert got["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
        assert got["image_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
        assert got["image_f1max"] == pytest.approx(_f1max(y, s), abs=1e-9)
        det = saved["variants"]["detection_score"]["categories"][cat]["image_auroc"]
        assert det == pytest.approx(roc_auc_score(y, rows.detection_score), abs=1e-9)
        fus = saved["variants"]["fusion"]["categories"][cat]["image_auroc"]
        assert fus == pytest.approx(roc_auc_score(y, rows.fused_score), abs=1e-9)
        map_s = saved["variants"]["map_score"]["categories"][cat]["image_auroc"]
        assert map_s == pytest.approx(roc_auc_score(y, rows.map_score), abs=1e-9)
        # pixel level: saved maps (scores.csv order) against masks read independently
        maps = np.load(out / "maps" / f"{cat}.npy")
        samples = list(iter_samples(synth_root, cat, "test"))
        assert [str(x.path) for x in samples] == rows.path.tolist()
        ds = ImageDataset(samples, size, tiny_model.cfg.data)
        masks = torch.stack([ds[i]["mask"][0] for i in range(len(ds))]).numpy() > 0
        assert got["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
        assert got["pixel_f1max"] == pytest.approx(_f1max(masks.ravel(), maps.ravel()), rel=1e-6)
        assert got["aupro"] == pytest.approx(_aupro(masks, maps), abs=1e-6)
        # the decisions written and the pictures' region (maps above the map threshold)
        decided = saved["decisions"]["categories"][cat]
        flagged = rows.decision.to_numpy() == "anomalous"
        assert decided["images_flagged"] == flagged.sum()
        assert decided["image_recall"] == pytest.approx((flagged & (y == 1)).sum() / y.sum())
        level, _ = map_threshold(tiny_model)
        if level is None:  # no calibrated map threshold: no region
            assert decided["pixel_iou"] is None
        else:
            region = maps > level
            union = (region | masks).sum()
            assert decided["pixel_iou"] == pytest.approx((region & masks).sum() / union)
    mean = np.mean([saved["categories"][c]["pixel_auroc"] for c in CATS])
    assert saved["mean"]["pixel_auroc"] == pytest.approx(mean)
    # the random test backbone is not the one the SOURCE references were scored with
    assert saved["protocol"]["fusion_reference"].startswith("test images of the category (")


def test_outputs_are_complete_and_rescorable(evaluated, tiny_model):
    out, result = evaluated
    scores = pd.read_csv(out / "scores.csv")
    for col in ("path", "category", "label", "image_score", "detection_score", "fused_score"):
        assert col in scores.columns
    assert result["counts"]["grain"] == {"images": 10, "good": 4, "defect": 6}
    npz = np.load(out / "noise_features.npz")
    assert npz["F"].shape == (len(scores), tiny_model.bank.n_stages, tiny_model.bank.m_samples)
    assert npz["category"].tolist() == scores.category.tolist()
    # the stored F and calibration rescore the detection score without the model
    std = npz["stage_std"] if npz["standardise"] else None
    mean = npz["stage_mean"] if npz["standardise"] else None
    rescored = weighted_score(
        torch.from_numpy(npz["F"]),
        torch.from_numpy(npz["weights"]),
        None if mean is None else torch.from_numpy(mean),
        None if std is None else torch.from_numpy(std),
    ) + float(npz["bias"])
    np.testing.assert_allclose(rescored.numpy(), scores.detection_score, rtol=1e-4, atol=1e-4)
    metrics_csv = pd.read_csv(out / "metrics.csv")
    assert {"dzad", "dzad: detection_score", "control: feature kNN (source bank)"} <= set(
        metrics_csv.method
    )
    for cat in CATS:
        assert (out / "figures" / f"{cat}_roc.png").stat().st_size > 0
        assert (out / "figures" / f"{cat}_heatmaps.png").stat().st_size > 0
    assert not list(out.rglob("*.tmp*"))  # every write was atomic


def test_controls_section_scores_the_same_images(evaluated, synth_root, tiny_model):
    out, result = evaluated
    assert set(result["controls"]) == {"mean_intensity", "laplacian", "feature_mean", "feature_knn"}
    scores = pd.read_csv(out / "scores.csv")
    rows = scores[scores.category == "grain"]
    ds = ImageDataset(list(iter_samples(synth_root, "grain", "test")), 32, tiny_model.cfg.data)
    intensity = [float(ds[i]["image"].mean()) for i in range(len(ds))]
    want = roc_auc_score(rows.label, intensity)
    got = result["controls"]["mean_intensity"]["categories"]["grain"]["image_auroc"]
    assert got == pytest.approx(want)
    assert result["controls"]["mean_intensity"]["categories"]["grain"].get("pixel_auroc") is None


def test_skipped_categories_and_metrics_are_explained(tmp_path, tiny_model, synth_root):
    root = tmp_path / "data"
    shutil.copytree(synth_root / "grain" / "test" / "good", root / "goodonly" / "test" / "good")
    shutil.copytree(synth_root / "grain" / "train", root / "trainonly" / "train")
    cfg = replace(tiny_model.cfg.evaluate, batch_size=8, figures=False, max_images=3)
    result = evaluate(tiny_model, root, [], tmp_path / "out", cfg)
    assert result["skipped"]["categories"] == {"trainonly": "no test images"}
    reasons = result["skipped"]["metrics"]["goodonly"]
    assert "no defect test images" in reasons["image_auroc"]
    assert reasons["pixel_auroc"] == "no defect pixels in the masks"
    assert result["categories"]["goodonly"]["image_auroc"] is None
    assert result["counts"]["goodonly"]["images"] == 3  # seeded subset of max_images
    assert result["controls"] == {}
    json.loads((tmp_path / "out" / "metrics.json").read_text())  # standard JSON (no NaN)


def test_missing_masks_give_image_metrics_and_fusion_ranks_against_source(
    tmp_path, tiny_checkpoint, synth_root
):
    model = DZAD.from_checkpoint(tiny_checkpoint)  # the calibration's backbone: references valid
    root = tmp_path / "data"
    shutil.copytree(synth_root / "grain", root / "grain")
    gone = sorted((root / "grain" / "ground_truth").rglob("*_mask.png"))[0]
    gone.unlink()
    cfg = replace(model.cfg.evaluate, batch_size=4, figures=False)
    result = evaluate(model, root, ["grain"], tmp_path / "out", cfg)
    got = result["categories"]["grain"]
    assert got["image_auroc"] is not None and got["pixel_auroc"] is None and got["aupro"] is None
    why = result["skipped"]["metrics"]["grain"]["pixel_auroc"]
    assert why == "1 of 6 defect images have no mask: image metrics only"
    assert "image_auroc" not in result["skipped"]["metrics"]["grain"]
    assert result["protocol"]["fusion_reference"] == "SOURCE normals (6 held-out images)"
    # fused scores are ranks among the SOURCE references, not among the category's images
    rows = pd.read_csv(tmp_path / "out" / "scores.csv")
    calib = model.calibration
    want = rank_fusion(
        torch.tensor(rows.map_score.to_numpy()),
        torch.tensor(rows.detection_score.to_numpy()),
        calib.ref_map,
        calib.ref_detection,
    )
    np.testing.assert_allclose(rows.fused_score, want.numpy(), rtol=1e-5, atol=1e-6)
    within = rank_fusion(
        torch.tensor(rows.map_score.to_numpy()), torch.tensor(rows.detection_score.to_numpy())
    )
    assert not np.allclose(rows.fused_score, within.numpy())


@pytest.mark.shared_data
def test_real_datasets_evaluate_and_match_sklearn(tmp_path, tiny_model, shared_datasets):
    cats = ["glass", "magnetic_tile", "mpdd_metal_plate"]  # grey JPEG, odd sizes, no train split
    cfg = replace(tiny_model.cfg.evaluate, batch_size=8, figures=False, max_images=8)
    result = evaluate(tiny_model, shared_datasets, cats, tmp_path, cfg)
    scores = pd.read_csv(tmp_path / "scores.csv")
    for cat in cats:
        rows = scores[scores.category == cat]
        assert len(rows) == 8
        got = result["categories"][cat]["image_auroc"]
        if rows.label.nunique() == 2:
            assert got == pytest.approx(roc_auc_score(rows.label, rows.image_score), abs=1e-9)
        else:
            assert got is None and "image_auroc" in result["skipped"]["metrics"][cat]


def test_unreadable_test_image_stops_or_is_skipped(tmp_path, tiny_model, synth_root):
    from dzad.errors import DZADInputError

    root = tmp_path / "data"
    shutil.copytree(synth_root / "grain" / "test", root / "grain" / "test")
    shutil.copytree(synth_root / "grain" / "ground_truth", root / "grain" / "ground_truth")
    good = (root / "grain" / "test" / "good" / "000.png").read_bytes()
    (root / "grain" / "test" / "good" / "zz.png").write_bytes(good[:60])  # truncated
    cfg = replace(tiny_model.cfg.evaluate, batch_size=8, figures=False)
    with pytest.raises(DZADInputError, match=r"zz\.png"):
        evaluate(tiny_model, root, ["grain"], tmp_path / "stopped", cfg)
    assert not (tmp_path / "stopped" / "metrics.json").exists()
    result = evaluate(tiny_model, root, ["grain"], tmp_path / "skipped", cfg, skip_bad=True)
    assert len(result["skipped"]["files"]) == 1 and "zz.png" in result["skipped"]["files"][0]
    assert result["counts"]["grain"]["images"] == 10
