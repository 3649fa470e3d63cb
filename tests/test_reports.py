"""dzad.reports: numbers land in the right cells, mean rows and seed statistics are right."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest

from dzad.panels import MapScale, blend
from dzad.reports import (
    Extremes,
    ablation_table,
    auroc_table,
    plot_roc_curves,
    plot_weighting_bars,
    summary_table,
    weighting_table,
)


def result(values: dict[str, float], controls: dict[str, dict[str, float]] | None = None) -> dict:
    """A metrics.json-like result with image_auroc per category (pixel_auroc = value / 2)."""
    cats = {c: {"image_auroc": v, "pixel_auroc": v / 2} for c, v in values.items()}
    out = {"categories": cats, "mean": {"image_auroc": float(np.nanmean(list(values.values())))}}
    if controls:
        out["controls"] = {name: result(vals) for name, vals in controls.items()}
    return out


def test_auroc_table_cells_mean_row_and_controls():
    runs = {
        "DZAD": result(
            {"bottle": 0.9, "cable": 0.7}, {"feature_knn": {"bottle": 0.6, "cable": 0.4}}
        ),
        "DZAD (SD)": result({"bottle": 0.8, "cable": math.nan}),
    }
    table = auroc_table(runs)
    assert list(table.mean.columns) == ["DZAD", "DZAD (SD)", "control: feature_knn"]
    assert list(table.mean.index) == ["bottle", "cable", "mean"]
    assert table.mean.loc["cable", "DZAD"] == pytest.approx(0.7)
    assert table.mean.loc["bottle", "control: feature_knn"] == pytest.approx(0.6)
    assert table.mean.loc["mean", "DZAD"] == pytest.approx(0.8)
    assert table.mean.loc["mean", "control: feature_knn"] == pytest.approx(0.5)
    assert table.mean.loc["mean", "DZAD (SD)"] == pytest.approx(0.8)  # NaN category skipped
    assert table.std is None
    md = table.to_markdown()
    assert md.splitlines()[0] == "| category | DZAD | DZAD (SD) | control: feature_knn |"
    assert "| cable | 0.700 | n/a | 0.400 |" in md
    csv = pd.read_csv(io.StringIO(table.to_csv()), index_col=0)
    assert csv.loc["mean", "control: feature_knn"] == pytest.approx(0.5)
    pixel = auroc_table(runs, metric="pixel_auroc", controls=False)
    assert list(pixel.mean.columns) == ["DZAD", "DZAD (SD)"]
    assert pixel.mean.loc["bottle", "DZAD"] == pytest.approx(0.45)


def test_auroc_table_mean_and_std_over_seeds(tmp_path):
    seeds = [
        result({"a": 0.6, "b": 0.8}),
        result({"a": 0.8, "b": 1.0}),
        result({"a": 0.7, "b": 0.6}),
    ]
    table = auroc_table({"DZAD": seeds})
    assert table.mean.loc["a", "DZAD"] == pytest.approx(0.7)
    assert table.std.loc["a", "DZAD"] == pytest.approx(0.1)  # sample std of .6 .8 .7
    # mean row: per-seed macro means .7, .9, .65 -> mean .75, sample std
    assert table.mean.loc["mean", "DZAD"] == pytest.approx(0.75)
    assert table.std.loc["mean", "DZAD"] == pytest.approx(np.std([0.7, 0.9, 0.65], ddof=1))
    assert "| a | 0.700 ± 0.100 |" in table.to_markdown()
    md, csv = table.write(tmp_path / "tables", "image_auroc")
    assert md.read_text() == table.to_markdown()
    frame = pd.read_csv(csv, index_col=0)
    assert frame.loc["a", "DZAD std"] == pytest.approx(0.1)
    assert not list((tmp_path / "tables").glob(".*tmp*"))  # no temp files left behind


def test_summary_table_rows_are_methods_and_controls():
    per_target = {
        "glass": {"DZAD": [result({"glass": 0.9}, {"laplacian": {"glass": 0.3}})] * 2},
        "mpdd": {"DZAD": [result({"plate": 0.6, "x": 0.8}), result({"plate": 0.8, "x": 1.0})]},
    }
    table = summary_table(per_target, metrics=("image_auroc", "pixel_auroc"))
    assert list(table.mean.index) == ["DZAD", "control: laplacian"]
    assert table.mean.loc["DZAD", "glass: image_auroc"] == pytest.approx(0.9)
    assert table.mean.loc["control: laplacian", "glass: pixel_auroc"] == pytest.approx(0.15)
    assert table.mean.loc["DZAD", "mpdd: image_auroc"] == pytest.approx(0.8)
    assert table.std.loc["DZAD", "mpdd: image_auroc"] == pytest.approx(np.std([0.7, 0.9], ddof=1))
    assert math.isnan(table.mean.loc["control: laplacian", "mpdd: image_auroc"])


def test_ablation_table_has_table3_shape():
    rows = [
        ({"SD": True}, result({"a": 0.5, "b": 0.7})),
        ({"SD": True, "SGSD": True, "M_t": True, "F_b": True, "w_t": True}, result({"a": 0.9})),
    ]
    table = ablation_table(rows)
    assert list(table.marks.columns) == ["SD", "SGSD", "M_t", "F_b", "w_t"]
    assert list(table.mean.columns) == ["cls", "seg"]
    assert list(table.mean.index) == ["SD", "SD+SGSD+M_t+F_b+w_t"]
    assert table.mean.loc["SD", "cls"] == pytest.approx(0.6)
    assert table.mean.loc["SD", "seg"] == pytest.approx(0.3)
    assert table.marks.loc["SD"].tolist() == [True, False, False, False, False]
    md = table.to_markdown().splitlines()
    assert md[0] == "| configuration | SD | SGSD | M_t | F_b | w_t | cls | seg |"
    assert md[2] == "| SD | ✓ |  |  |  |  | 0.600 | 0.300 |"
    with pytest.raises(ValueError, match="unknown Table-3 flag"):
        ablation_table([({"SG": True}, result({"a": 0.5}))])


def test_weighting_table_has_table4_shape_and_bar_chart(tmp_path):
    results = {
        "uniform": {"mvtec": result({"a": 0.9, "b": 0.7}), "visa": result({"c": 0.8})},
        "snr": {"mvtec": [result({"a": 0.6, "b": 0.8}), result({"a": 0.8, "b": 0.8})]},
    }
    table = weighting_table(results)
    assert list(table.mean.index) == ["uniform", "snr"]
    assert list(table.mean.columns) == ["mvtec", "visa"]
    assert table.mean.loc["uniform", "mvtec"] == pytest.approx(0.8)
    assert table.mean.loc["snr", "mvtec"] == pytest.approx(0.75)
    assert math.isnan(table.mean.loc["snr", "visa"])
    path = plot_weighting_bars(table, tmp_path / "weights.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roc_figure_is_written(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    curves = {"a": (labels, labels + rng.random(50)), "all_good": (np.zeros(5), rng.random(5))}
    path = plot_roc_curves(curves, tmp_path / "figs" / "roc.png", title="target")
    assert path.exists() and path.stat().st_size > 1000


def test_overlay_and_heat_map_grid_keep_the_extremes(tmp_path):
    image = np.zeros((16, 16, 3))
    m = np.zeros((4, 4))
    m[0, 0] = 1.0  # one hot corner, upsampled onto the image
    out = blend(image, m, MapScale.of_run(None, 0.0, 1.0))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[0, 0].sum() > out[15, 15].sum()  # hot corner brighter than the cold one
    ext = Extremes(2)
    for i, score in enumerate([0.3, 0.9, 0.1, 0.5, 0.7]):
        ext.add(score, image, m, np.zeros((16, 16), bool), f"img{i}")
    assert sorted(it.name for it in ext.high) == ["img1", "img4"]  # two highest
    assert sorted(it.name for it in ext.low) == ["img0", "img2"]  # two lowest
    path = ext.plot(tmp_path / "grid.png", "title", threshold=0.5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
