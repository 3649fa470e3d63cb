"""Pictures, report and masks of the regimes (method.md §11.1): the label-free map threshold
(`regime.mask_k`), `dzad evaluate --batch-zero-shot / --few-shot K --save-masks` and `dzad score
--batch-zero-shot / --reference DIR --save-masks`."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dzad.cli import app
from dzad.config import RegimeConfig
from dzad.panels import predicted_mask
from dzad.regimes import image_rule, map_level, outlier_threshold

runner = CliRunner()
SIDE, SQUARE = 64, (slice(16, 32), slice(32, 48))  # planted square: rows 16-31, columns 32-47


def test_map_threshold_is_median_plus_k_scaled_mads_of_every_pixel():
    maps = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 100]).reshape(1, 1, 3, 3)
    # median 5; |x - 5| = 4 3 2 1 0 1 2 3 95 -> MAD 2; 5 + 2 * 1.4826 * 2
    assert map_level(maps, replace(RegimeConfig(), mask_k=2.0)) == pytest.approx(10.9304)
    assert outlier_threshold(maps, 3.0) == pytest.approx(13.8956)
    # over the whole batch, not per image: a second image moves the median and the MAD
    two = torch.cat([maps, torch.zeros(1, 1, 3, 3)])  # median 0, MAD 0: the level is 0
    assert map_level(two, RegimeConfig()) == 0.0
    rule = image_rule(torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 100]))
    assert rule.value == pytest.approx(13.8956) and (rule.low, rule.high) == (1.0, 100.0)


def _planted_images(folder) -> list[str]:
    """8 flat grey noise images, SIDE px; ``3.png`` has a white square (rows 16-31, cols 32-47)."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    names = []
    for i in range(8):
        a = 0.5 + 0.05 * rng.standard_normal((SIDE, SIDE, 1)).repeat(3, 2)
        if i == 3:
            a[SQUARE] = 1.0
        Image.fromarray((a.clip(0, 1) * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
        names.append(f"{i}.png")
    return names


@pytest.mark.parametrize("regime", ["batch", "reference"])
def test_score_masks_are_the_batch_threshold_and_mark_the_planted_square(
    tiny_checkpoint, tmp_path, regime
):
    images = tmp_path / "images"
    names = _planted_images(images)
    params = tmp_path / "regime.yaml"
    params.write_text(f"regime:\n  image_size: {SIDE}\n  degrees: [1, 3]\n  dzad_weight: 0.0\n")
    out = tmp_path / "out"
    args = ["score", str(images), "-m", str(tiny_checkpoint), "-o", str(out), "--random-backbone"]
    args += ["--regime-params", str(params), "--save-masks", "--save-maps", "--pictures"]
    if regime == "batch":
        args.append("--batch-zero-shot")
    else:
        refs = tmp_path / "refs"
        _planted_images(refs)
        (refs / "3.png").unlink()  # the references are the normal images
        args += ["--reference", str(refs)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    maps = {n: np.load(out / "maps" / f"{n}.npy") for n in names}
    level = map_level(torch.from_numpy(np.stack(list(maps.values()))), RegimeConfig())
    report = (out / "report.html").read_text()
    if regime == "reference":  # the references' leave-one-out maps set it: read it (4 digits)
        assert "the 0.99 quantile of the references&#x27; leave-one-out map values" in report
        shown = float(re.search(r"map threshold ([-0-9.e+]+)", report).group(1))
        assert shown != pytest.approx(level, rel=1e-3)  # not the batch rule
    marked = {}
    for n in names:
        mask = np.asarray(Image.open(out / "masks" / f"{n}.mask.png"))
        assert set(np.unique(mask)) <= {0, 255} and mask.shape == (SIDE, SIDE)
        marked[n] = mask > 0
        if regime == "batch":
            expected = predicted_mask(maps[n], level, (SIDE, SIDE))
            np.testing.assert_array_equal(marked[n], expected)
        else:  # above the shown level, up to its rounding
            assert (maps[n][marked[n]] > shown * (1 - 1e-3)).all()
            assert (maps[n][~marked[n]] <= shown * (1 + 1e-3)).all()
    square = marked["3.png"][SQUARE]
    assert square.all()  # every planted pixel is in the predicted region
    rows, cols = np.nonzero(marked["3.png"])
    assert 8 <= rows.mean() <= 40 and 24 <= cols.mean() <= 56  # centred on it (+- 8 px)
    normal = sum(int(m.sum()) for n, m in marked.items() if n != "3.png")
    assert normal < marked["3.png"].sum()  # all 7 normal images together: less than the planted
    assert "map threshold" in report


@pytest.fixture()
def regime_params(tmp_path):
    p = tmp_path / "regime.yaml"
    p.write_text(
        "regime:\n  image_size: 32\n  degrees: [1, 3]\n  dzad_weight: 0.5\n  adapt_steps: 0\n"
        "  few_shot_draws: 2\n  group_size: 0\n  mask_k: 2.0\n"
    )
    return p


def test_batch_evaluate_masks_are_each_batch_map_above_its_threshold(
    tiny_model, synth_root, tmp_path
):
    """The library writes the zero-shot evaluate's pictures and masks for the regime's fused maps
    (`adapt_steps: 0`: the frozen copy, so a second scoring gives the same maps)."""
    from dzad.config import EvalConfig
    from dzad.data.dataset import ImageDataset
    from dzad.evaluation import category_samples, control_backbone
    from dzad.regime_evaluation import evaluate_regime
    from dzad.regimes import score_batch

    rc = replace(
        RegimeConfig(), image_size=32, degrees=(1, 3), dzad_weight=0.5, group_size=0, mask_k=2.0
    )
    backbone, out = control_backbone(tiny_model), tmp_path / "ev"
    evaluate_regime(
        tiny_model, backbone, synth_root, ["grain"], out, rc, EvalConfig(), pictures=True,
        save_masks=True,
    )  # fmt: skip
    samples = category_samples(synth_root, "grain", EvalConfig(), rc.seed, False)
    ds = ImageDataset(samples, 32, tiny_model.cfg.data)
    scored = score_batch(
        backbone, torch.stack([ds[i]["image"] for i in range(len(ds))]), rc, tiny_model
    )
    level = map_level(scored.maps, rc)
    table = pd.read_csv(out / "scores.csv")
    assert table["path"].tolist() == [str(s.path) for s in samples]
    # the per-image evaluation's and dzad score's column name, once
    assert list(table.columns[:5]) == ["path", "label", "draw", "image_score", "decision"]
    np.testing.assert_allclose(table["image_score"], scored.scores.numpy(), rtol=1e-6)
    for i, row in table.iterrows():
        mask = np.asarray(Image.open(out / row["mask"])) > 0
        np.testing.assert_array_equal(
            mask, predicted_mask(scored.maps[i, 0].numpy(), level, (32, 32))
        )
        assert (out / row["panel"]).is_file() and (out / row["heatmap"]).is_file()
    rule = image_rule(scored.scores)
    assert (table["decision"] == "anomalous").tolist() == (scored.scores > rule.value).tolist()
    assert table["mask"].map(lambda p: (np.asarray(Image.open(out / p)) > 0).any()).any()
    # metrics.json's decisions: the written decisions and masks against the labels and masks
    flagged, defective = table["decision"] == "anomalous", table["label"] == 1
    region = np.stack([np.asarray(Image.open(out / p)) > 0 for p in table["mask"]])
    truth = np.stack([ds[i]["mask"][0].numpy() > 0.5 for i in range(len(ds))])
    tp, fp = int((region & truth).sum()), int((region & ~truth).sum())
    got = json.loads((out / "metrics.json").read_text())["decisions"]["categories"]["grain"]
    assert got["images_flagged"] == flagged.sum()
    assert got["image_recall"] == pytest.approx((flagged & defective).sum() / defective.sum())
    assert got["pixel_precision"] == pytest.approx(tp / (tp + fp))
    assert got["pixel_recall"] == pytest.approx(tp / truth.sum())
    assert got["pixel_iou"] == pytest.approx(tp / (region | truth).sum())
    report = (out / "report.html").read_text()
    assert "regime.mask_k" in report and report.count('class="row"') == len(samples)


def test_cli_regimes_write_pictures_and_masks_few_shot_of_the_first_draw(
    tiny_checkpoint, synth_root, tmp_path, regime_params
):
    base = ["evaluate", "--model", str(tiny_checkpoint), "--data", str(synth_root)]
    base += ["--categories", "grain", "--random-backbone", "--regime-params", str(regime_params)]
    out = tmp_path / "few"
    res = runner.invoke(app, [*base, "--out", str(out), "--few-shot", "4", "--save-masks"])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out / "scores.csv")
    first, second = table[table["draw"] == 0], table[table["draw"] == 1]
    assert len(first) == len(second) == 10
    assert first[["heatmap", "panel", "thumb", "mask"]].notna().all().all()
    assert second[["heatmap", "panel", "mask"]].isna().all().all()  # draw 0's pictures only
    assert all((out / p).is_file() for p in first["mask"])
    assert len(list((out / "panels").rglob("*.panel.png"))) == 10
    assert "reference draw 0 of 2" in (out / "report.html").read_text()
    out = tmp_path / "batch"
    res = runner.invoke(app, [*base, "--out", str(out), "--batch-zero-shot", "--save-masks"])
    assert res.exit_code == 0, res.output
    assert len(list((out / "masks").rglob("*.mask.png"))) == 10
    maps = runner.invoke(app, [*base, "--out", str(out), "--batch-zero-shot", "--save-maps"])
    assert maps.exit_code == 2 and "--save-maps" in maps.stderr


@pytest.mark.parametrize("value", ["0", "-1", ".nan"])
def test_mask_k_must_be_positive(tmp_path, value):
    from dzad.config import load

    p = tmp_path / "p.yaml"
    p.write_text(f"regime:\n  mask_k: {value}\n")
    with pytest.raises(ValueError, match=r"regime\.mask_k"):
        load(p)
