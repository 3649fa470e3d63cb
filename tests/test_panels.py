"""Heat maps on one run scale, predicted masks, the normalised score, the 80-column table."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dzad.cli import app
from dzad.decisions import Threshold, decision_threshold, map_threshold
from dzad.panels import BAR_W, CAPTION_H, REGION, MapScale, _outline, draw, inferno, predicted_mask

runner = CliRunner()


def test_one_scale_fades_below_threshold_and_colours_alike_across_images():
    scale = MapScale.of_run(threshold=1.0, low=0.0, high=3.0)
    weak = np.array([[0.5, 0.9], [1.5, 2.0]])  # a "good" image: low values
    strong = np.array([[0.5, 2.0], [2.9, 3.0]])
    rgb_w, alpha_w = scale.colours(weak)
    rgb_s, alpha_s = scale.colours(strong)
    assert (alpha_w[weak <= 1.0] == 0).all() and (alpha_w[weak > 1.0] > 0).all()
    # the same value gets the same colour in both images (per-image min..max would differ)
    np.testing.assert_allclose(rgb_w[1, 1], rgb_s[0, 1])
    assert alpha_s[1, 1] > alpha_w[1, 1]  # higher values are more opaque
    assert MapScale.of_run(5.0, 0.0, 3.0).top == 5.0  # top never below the threshold


def test_colours_are_matplotlibs_inferno_to_one_level():
    from matplotlib import colormaps

    level = np.linspace(0, 1, 1001)
    expected = colormaps["inferno"](level)[:, :3] * 255
    rgb, _ = MapScale.of_run(None, 0.0, 1.0).colours(level)
    assert rgb.dtype == np.uint8 and np.abs(rgb - expected).max() <= 0.5
    assert inferno().shape == (256, 3)


def test_outline_is_the_region_border_not_the_image_border():
    mask = np.zeros((8, 8), bool)
    mask[:, :4] = True  # left half, touching three image borders
    edge = _outline(mask, 1)
    np.testing.assert_array_equal(np.nonzero(edge.any(axis=0))[0], [3, 4])  # columns 3 and 4 only
    assert edge[:, 3:5].all()
    assert not _outline(np.ones((8, 8), bool), 1).any()


def test_panel_draws_the_predicted_region_and_truth():
    image = np.full((32, 32, 3), 0.5)
    m = np.zeros((8, 8), np.float32)
    m[2:4, 2:4] = 5.0  # one hot spot, top-left quarter
    truth = np.zeros((32, 32), bool)
    truth[20:28, 20:28] = True
    scale = MapScale.of_run(1.0, 0.0, 5.0)
    img = np.asarray(draw(image, m, scale, "x", True, truth)[1])
    assert img.shape == (256 + CAPTION_H, 3 * 256 + 2 * 4 + BAR_W, 3)
    region = img[CAPTION_H:, 2 * 260 : 2 * 260 + 256]
    green = (region == REGION).all(axis=-1)
    ys, xs = np.nonzero(green)
    assert green.any() and ys.max() < 150 and xs.max() < 150  # around the hot spot (64..128)
    cyan = (region == (0, 230, 230)).all(axis=-1)
    assert cyan.any() and np.nonzero(cyan)[0].min() >= 150  # truth contour bottom-right
    plain = np.asarray(draw(image, m, MapScale.of_run(None, 0.0, 5.0), "x", True)[1])
    assert plain.shape[1] == 2 * 256 + 4 + BAR_W  # no threshold: no region tile


def test_predicted_mask_is_the_resized_map_above_threshold():
    m = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
    mask = predicted_mask(m, 1.5, (4, 6))
    assert mask.shape == (4, 6) and mask.dtype == bool
    assert mask[-1].all() and not mask[0].any()


def test_normalised_score_puts_the_decision_at_one_half():
    rule = Threshold("detection_score", 2.0, low=1.0, high=3.0)
    assert rule.normalise(2.0) == 0.5
    assert rule.normalise(2.5) == pytest.approx(0.75)
    assert rule.normalise(1.0) == 0.0 and rule.normalise(100.0) == 1.0
    assert Threshold("image_score", 2.0).normalise(3.0) is None  # no references: not normalised
    assert Threshold("detection_score", 0.5, probability=True).normalise(0.3) == 0.3


def test_thresholds_come_from_the_calibration(tiny_checkpoint):
    from dzad.model import DZAD

    model = DZAD.from_checkpoint(tiny_checkpoint)
    level, note = map_threshold(model)
    q = model.cfg.detection.threshold_quantile
    assert level == pytest.approx(float(torch.quantile(model.calibration.ref_map.double(), q)))
    assert "SOURCE-normal" in note
    rule = decision_threshold(model)
    assert rule.key == "detection_score" and rule.value == pytest.approx(model.calibration.tau)
    assert decision_threshold(model, 0.7).key == "image_score"
    randomised = DZAD.from_checkpoint(tiny_checkpoint, random_backbone=True)
    level, note = map_threshold(randomised)  # other map settings than at calibration
    assert level is None and "differ" in note


@pytest.mark.parametrize("shape", [(1, 1), (1, 7, 3), (5, 9), (33, 17, 3)])
def test_png_bytes_decode_to_the_same_pixels(shape):
    import io

    from dzad.run_panels import png_bytes

    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    pixels[len(pixels) // 2 :] = pixels[0]  # repeated rows: "Up" differences of zero
    back = Image.open(io.BytesIO(png_bytes(Image.fromarray(pixels))))
    assert back.mode == ("RGB" if len(shape) == 3 else "L")
    np.testing.assert_array_equal(np.asarray(back), pixels)
    with pytest.raises(ValueError, match="mode RGBA"):
        png_bytes(Image.new("RGBA", (2, 2)))


@pytest.fixture(scope="module")
def masked(tmp_path_factory, synth_root, tiny_checkpoint):
    out = tmp_path_factory.mktemp("masked") / "out"
    paths = [synth_root / "grain" / "test", synth_root / "weave" / "test" / "good"]
    args = ["score", *map(str, paths), "-m", str(tiny_checkpoint), "-o", str(out)]
    args += ["--save-masks", "--save-maps", "--pictures"]
    result = runner.invoke(app, args, env={"COLUMNS": "80"})
    return result, out


def test_save_masks_writes_the_thresholded_maps(masked, tiny_checkpoint):
    from dzad.model import DZAD

    result, out = masked
    assert result.exit_code == 0, result.output
    level, _ = map_threshold(DZAD.from_checkpoint(tiny_checkpoint))
    table = pd.read_csv(out / "scores.csv")
    assert table["mask"].notna().all()
    for mask_rel, heat_rel in zip(table["mask"], table["heatmap"], strict=True):
        mask = np.asarray(Image.open(out / mask_rel))
        assert set(np.unique(mask)) <= {0, 255} and mask.shape == (32, 32)
        raw_rel = heat_rel.replace("heatmaps/", "maps/", 1).replace(".heatmap.png", ".npy")
        expected = predicted_mask(np.load(out / raw_rel), level, (32, 32))
        np.testing.assert_array_equal(mask > 0, expected)
    assert table["mask"].map(lambda p: (np.asarray(Image.open(out / p)) > 0).any()).any()


def test_normalised_score_agrees_with_the_decision(masked):
    _, out = masked
    table = pd.read_csv(out / "scores.csv")
    assert table["normalised_score"].between(0, 1).all()
    np.testing.assert_array_equal(table["normalised_score"] > 0.5, table["decision"] == "anomalous")


def test_table_fits_80_columns_with_relative_paths(masked):
    result, _ = masked
    lines = result.stdout.splitlines()
    assert max(len(ln) for ln in lines if "│" in ln or "┃" in ln) <= 80
    names = {m.group(1) for ln in lines for m in [re.search(r"│ (\S+\.png)", ln)] if m}
    assert "grain/test/contamination/000.png" in names and "weave/test/good/000.png" in names


def test_save_masks_without_pictures_writes_the_same_masks(masked, tiny_checkpoint, synth_root):
    _, drawn = masked
    out = drawn.parent / "masks_only"
    paths = [synth_root / "grain" / "test", synth_root / "weave" / "test" / "good"]
    args = ["score", *map(str, paths), "-m", str(tiny_checkpoint), "-o", str(out)]
    result = runner.invoke(app, [*args, "--save-masks"])
    assert result.exit_code == 0, result.output
    table, reference = pd.read_csv(out / "scores.csv"), pd.read_csv(drawn / "scores.csv")
    assert table["heatmap"].isna().all() and not (out / "heatmaps").exists()
    assert table["mask"].tolist() == reference["mask"].tolist()
    for rel in table["mask"]:
        assert (out / rel).read_bytes() == (drawn / rel).read_bytes()


def test_save_masks_without_a_calibrated_threshold_stops_before_writing(
    tiny_checkpoint, synth_root, tmp_path
):
    out = tmp_path / "o"
    image = synth_root / "weave" / "test" / "good" / "000.png"
    args = ["score", str(image), "-m", str(tiny_checkpoint), "-o", str(out)]
    result = runner.invoke(app, [*args, "--random-backbone", "--save-masks"])
    assert result.exit_code == 2 and "--save-masks" in result.stderr
    assert not out.exists()


def test_evaluate_writes_panels_with_the_ground_truth_and_masks(
    tiny_checkpoint, synth_root, tmp_path
):
    out = tmp_path / "ev"
    args = ["evaluate", "-m", str(tiny_checkpoint), "--data", str(synth_root), "-o", str(out)]
    args += ["--categories", "grain", "--no-controls", "--save-masks"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "scores.csv")
    np.testing.assert_array_equal(table["normalised_score"] > 0.5, table["decision"] == "anomalous")
    for _, row in table.iterrows():
        img = np.asarray(Image.open(out / row["panel"]))
        truth = (img[CAPTION_H:] == (0, 230, 230)).all(axis=-1).any()
        assert truth == (row["label"] == 1), row["path"]  # cyan ground truth on defects only
        assert np.asarray(Image.open(out / row["mask"])).shape == (32, 32)
    assert (out / "report.html").is_file() and (out / "figures" / "grain_pr.png").is_file()
