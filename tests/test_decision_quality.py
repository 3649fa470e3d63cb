"""The regimes' label-free decisions measured against the labels (``dzad.decision_quality``,
``metrics.json``'s ``decisions``)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from dzad.cli import app
from dzad.decision_quality import DECISION_METRICS, DecisionCounts

runner = CliRunner()


def test_counts_pool_the_batches_and_give_precision_recall_f1_iou():
    counts = DecisionCounts()
    # batch 1: two defective (one flagged), one good flagged
    masks = torch.zeros(3, 1, 2, 2)
    masks[0, 0, 0] = 1  # 2 defect pixels
    maps = torch.zeros(3, 1, 2, 2)
    maps[0, 0, 0, 0] = maps[2, 0, 1, 1] = 1.0  # above 0.5: 1 hit, 1 false alarm
    counts.add(torch.tensor([1, 1, 0]), torch.tensor([True, False, True]), masks, maps, 0.5)
    # batch 2: one defective, flagged; its 4 defect pixels all in the region
    ones = torch.ones(1, 1, 2, 2)
    counts.add(torch.tensor([1]), torch.tensor([True]), ones, ones, 0.5)
    got = counts.result()
    assert got["images_flagged"] == 3
    assert got["image_precision"] == pytest.approx(2 / 3)
    assert got["image_recall"] == pytest.approx(2 / 3)
    assert got["image_f1"] == pytest.approx(2 / 3)
    # pixels: tp 5, fp 1, fn 1
    assert got["pixel_precision"] == pytest.approx(5 / 6)
    assert got["pixel_recall"] == pytest.approx(5 / 6)
    assert got["pixel_f1"] == pytest.approx(10 / 12)
    assert got["pixel_iou"] == pytest.approx(5 / 7)


def test_undefined_values_are_nan_not_zero():
    counts = DecisionCounts()
    counts.add(torch.tensor([1, 0]), torch.tensor([False, False]))  # nothing flagged, no masks
    got = counts.result()
    assert set(got) == set(DECISION_METRICS)
    assert math.isnan(got["image_precision"]) and got["image_recall"] == 0.0
    assert got["images_flagged"] == 0
    assert all(math.isnan(got[k]) for k in DECISION_METRICS if k.startswith("pixel"))


def test_few_shot_evaluate_writes_the_decisions_of_each_draw_averaged(
    tiny_checkpoint, synth_root, tmp_path
):
    params = tmp_path / "regime.yaml"
    params.write_text(
        "regime:\n  image_size: 32\n  degrees: [1, 3]\n  dzad_weight: 0.0\n  few_shot_draws: 2\n"
    )
    out = tmp_path / "few"
    args = ["evaluate", "--model", str(tiny_checkpoint), "--data", str(synth_root)]
    args += ["--categories", "grain", "--random-backbone", "--regime-params", str(params)]
    res = runner.invoke(app, [*args, "--out", str(out), "--few-shot", "3"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    got = metrics["decisions"]["categories"]["grain"]
    assert set(got) == set(DECISION_METRICS)
    assert metrics["decisions"]["mean"]["images_flagged"] == got["images_flagged"]
    table = pd.read_csv(out / "scores.csv")
    flagged = [int((table[table["draw"] == d]["decision"] == "anomalous").sum()) for d in (0, 1)]
    assert got["images_flagged"] == pytest.approx(sum(flagged) / 2)
    assert "decisions" in metrics["std"]


def test_few_shot_without_masks_writes_image_metrics_and_null_pixels(
    tiny_checkpoint, synth_root, tmp_path
):
    """Undefined pixel metrics (no masks) are null in ``std`` and ``decisions`` too: the NaN
    standard deviations once stopped metrics.json from being written at all."""
    root = tmp_path / "root"
    shutil.copytree(synth_root / "grain", root / "grain", ignore=shutil.ignore_patterns("*_mask*"))
    shutil.rmtree(root / "grain" / "ground_truth", ignore_errors=True)
    params = tmp_path / "regime.yaml"
    params.write_text("regime:\n  image_size: 32\n  degrees: [1, 3]\n  dzad_weight: 0.0\n")
    out = tmp_path / "few"
    args = ["evaluate", "--model", str(tiny_checkpoint), "--data", str(root), "--few-shot", "2"]
    args += ["--random-backbone", "--regime-params", str(params), "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["categories"]["grain"]["image_auroc"] is not None
    assert metrics["std"]["regime"]["grain"]["pixel_auroc"] is None
    assert metrics["decisions"]["categories"]["grain"]["pixel_iou"] is None


def test_zero_shot_evaluate_measures_its_calibrated_decisions_and_region(
    tmp_path, tiny_checkpoint, synth_root
):
    """Per image: tau's decisions (scores.csv) and the calibrated map threshold's region (the
    saved maps above it) against the labels and masks."""
    from dzad.data.dataset import ImageDataset, iter_samples
    from dzad.decisions import map_threshold
    from dzad.evaluation import evaluate
    from dzad.model import DZAD

    model = DZAD.from_checkpoint(tiny_checkpoint)  # the calibration's backbone: a map threshold
    level, _ = map_threshold(model)
    assert level is not None
    cfg = replace(model.cfg.evaluate, batch_size=4, figures=False)
    result = evaluate(model, synth_root, ["grain"], tmp_path / "out", cfg, save_maps=True)
    got = result["decisions"]["categories"]["grain"]
    rows = pd.read_csv(tmp_path / "out" / "scores.csv")
    flagged, defective = rows.decision == "anomalous", rows.label == 1
    assert got["images_flagged"] == flagged.sum()
    assert got["image_precision"] == pytest.approx((flagged & defective).sum() / flagged.sum())
    maps = np.load(tmp_path / "out" / "maps" / "grain.npy")
    ds = ImageDataset(
        list(iter_samples(synth_root, "grain", "test")), model.image_size, model.cfg.data
    )
    truth = np.stack([ds[i]["mask"][0].numpy() > 0.5 for i in range(len(ds))])
    region = maps > level
    assert got["pixel_precision"] == pytest.approx((region & truth).sum() / region.sum())
    assert got["pixel_recall"] == pytest.approx((region & truth).sum() / truth.sum())
    assert result["decisions"]["label"].startswith("the decisions written to scores.csv")
