"""Regimes (method.md §11.1): mutual / reference patch scores, rescoring, adaptation, draws, CLI."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from dzad.adaptation import (
    adapt_network,
    encode,
    excess_grid,
    noise_error,
    stitch,
    tile_layout,
    to_model_size,
    to_tiles,
)
from dzad.cli import app
from dzad.config import RegimeConfig
from dzad.data.dataset import collect_samples
from dzad.mutual_scoring import (
    interval_count,
    mutual_patch_scores,
    reference_patch_scores,
    rescore_images,
)
from dzad.regime_evaluation import draw_references, seeded_groups
from dzad.regimes import MIN_OUTLIER_SCORES, dzad_grids, fuse, image_rule, robust_scale

runner = CliRunner()


def normal_batch(b: int, h: int = 4, w: int = 4, c: int = 8, seed: int = 0) -> torch.Tensor:
    """``(b, h, w, c)`` patches drawn from 5 shared prototypes plus small noise (a normal batch)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(5, c, generator=g)
    pick = torch.randint(5, (b, h, w), generator=g)
    return protos[pick] + 0.05 * torch.randn(b, h, w, c, generator=g)


def brute_mutual(patches: torch.Tensor, fraction: float) -> torch.Tensor:
    """Direct triple loop of the definition (slow, obviously right)."""
    b, h, w, c = patches.shape
    flat = patches.reshape(b, h * w, c)
    k = interval_count(fraction, b - 1)
    out = torch.empty(b, h * w)
    for i in range(b):
        for p in range(h * w):
            d = [(flat[j] - flat[i, p]).norm(dim=1).min() for j in range(b) if j != i]
            out[i, p] = torch.stack(d).sort().values[:k].mean()
    return out.view(b, h, w)


def test_planted_defect_patch_ranks_top():
    x = normal_batch(8)
    x[3, 2, 1] += 4.0  # one defect patch in image 3
    scores = mutual_patch_scores(x, 0.3)
    assert scores.shape == (8, 4, 4)
    assert int(scores.flatten().argmax()) == 3 * 16 + 2 * 4 + 1
    assert int(scores.flatten(1).amax(1).argmax()) == 3


def test_mutual_matches_definition_and_chunking_changes_nothing():
    x = normal_batch(6, seed=1)
    want = brute_mutual(x, 0.5)
    torch.testing.assert_close(mutual_patch_scores(x, 0.5), want, rtol=1e-4, atol=1e-4)
    # 1 query row x 1 image per chunk: the smallest possible chunks
    torch.testing.assert_close(
        mutual_patch_scores(x, 0.5, max_elements=1), want, rtol=1e-4, atol=1e-4
    )


def test_interval_averaging_ignores_the_far_minority():
    """A patch shared with 2 of 5 other images but far from the rest: the nearest 40% average
    is 0, the mean over all others is not (the anomalous images never enter the interval)."""
    x = normal_batch(6, seed=2)
    x[0, 0, 0] = x[1, 0, 0] = x[2, 0, 0] = torch.full((8,), 9.0)
    assert mutual_patch_scores(x, 0.4)[0, 0, 0] < 1e-4
    assert mutual_patch_scores(x, 1.0)[0, 0, 0] > 1.0
    with pytest.raises(ValueError, match="fraction"):
        mutual_patch_scores(x, 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        mutual_patch_scores(x[:1], 0.3)


def test_reference_scores_are_nearest_reference_patch():
    q, r = normal_batch(3, seed=3), normal_batch(2, seed=4)
    got = reference_patch_scores(q, r, max_elements=7)
    bank = r.reshape(-1, 8)
    want = torch.cdist(q.reshape(-1, 8), bank).amin(1).view(3, 4, 4)
    torch.testing.assert_close(got, want)
    assert reference_patch_scores(r, r).abs().max() < 1e-2  # its own neighbour (mm rounding)


def test_rescore_averages_over_similar_images():
    scores = torch.tensor([1.0, 3.0, 10.0, 20.0])
    desc = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    torch.testing.assert_close(
        rescore_images(scores, desc, 2), torch.tensor([2.0, 2.0, 15.0, 15.0])
    )
    torch.testing.assert_close(rescore_images(scores, desc, 0), scores)


def test_fusion_weight_zero_is_backbone_order_and_dzad_moves_it():
    g = torch.Generator().manual_seed(0)
    bb, dz = torch.rand(4, 4, 4, generator=g), torch.zeros(4, 2, 2)
    dz[2, 1, 1] = 50.0
    assert torch.equal(fuse(bb, dz, 0.0), bb)  # no DZAD signal: the control's grid itself
    assert int(fuse(bb, dz, 0.9).flatten(1).amax(1).argmax()) == 2
    assert robust_scale(bb).flatten().median().abs() < 1e-6


def test_excess_grid_flags_the_position_above_the_references():
    g = torch.Generator().manual_seed(0)
    ref = 1.0 + 0.1 * torch.randn(5, 3, 4, 4, generator=g)
    x = 1.0 + 0.1 * torch.randn(4, 3, 4, 4, generator=g)
    x[1, :, 2, 3] += 2.0
    grid = excess_grid(x, ref, torch.ones(3))
    assert int(grid.flatten().argmax()) == 1 * 16 + 2 * 4 + 3
    x[0] = 0.0  # far BELOW the references everywhere: no excess
    assert excess_grid(x, ref, torch.ones(3))[0].abs().max() == 0


def test_adaptation_copies_and_drops_the_outlier(tiny_model, synth_root):
    from dzad.data.dataset import ImageDataset
    from tests.conftest import TINY_SIZE

    samples = collect_samples(synth_root, ("weave",), ("test",))
    goods = [s for s in samples if s.label == 0][:4]
    ds = ImageDataset(goods, TINY_SIZE, tiny_model.cfg.data)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    images = torch.cat([images, torch.rand(1, 3, TINY_SIZE, TINY_SIZE)])  # image 4: pure noise
    before = {k: v.clone() for k, v in tiny_model.net.state_dict().items()}
    x0, z0 = encode(tiny_model, images)
    cfg = RegimeConfig(adapt_steps=4, adapt_rounds=2, adapt_drop=0.2, adapt_batch_size=4)
    net, kept = adapt_network(tiny_model, x0, z0, cfg, robust=True)
    assert 4 not in kept and len(kept) == 4
    assert all(torch.equal(v, tiny_model.net.state_dict()[k]) for k, v in before.items())
    changed = any(not torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert changed
    assert noise_error(tiny_model, net, x0, z0).shape[:2] == (5, tiny_model.bank.n_stages)


def test_two_by_two_tiles_are_the_quadrants_and_stitch_back_in_place():
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    tiles = to_tiles(images, 128, 2)  # native size: crops, no resizing
    assert tiles.shape == (8, 3, 128, 128)
    assert torch.equal(tiles[4 + 1], images[1, :, :128, 128:])  # image 1, top right
    assert torch.equal(tiles[2], images[0, :, 128:, :128])  # image 0, bottom left
    maps = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 2, 8, 8)  # tile t's map: all t
    grid = stitch(maps, 256, 2, 128)
    assert grid.shape == (2, 2, 16, 16)
    quadrants = grid[:, 0, ::8, ::8]  # (B, 2, 2): top-left corner of each quadrant
    assert quadrants.tolist() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert torch.equal(grid, grid[:, :, ::8, ::8].repeat_interleave(8, 2).repeat_interleave(8, 3))


def test_overlapping_tiles_are_averaged_and_one_tile_is_the_whole_image():
    assert tile_layout(256, 128, 3) == (128, [0, 64, 128])
    assert tile_layout(256, 128, 1) == (256, [0])
    maps = torch.arange(9.0).view(9, 1, 1, 1).expand(9, 1, 8, 8)
    grid = stitch(maps, 256, 3, 128)[0, 0]  # 16x16; tiles 4 cells apart
    assert grid[0, 0] == 0 and grid[15, 15] == 8  # corners: one tile each
    assert grid[5, 5] == (0 + 1 + 3 + 4) / 4 and grid[0, 5] == (0 + 1) / 2
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    assert torch.equal(to_tiles(images, 128, 1), to_model_size(images, 128))
    assert stitch(maps, 256, 1, 128) is maps


def test_dzad_tiles_score_each_tile_at_the_model_size(tiny_model):
    """tiles = 1: the whole image at the model's size (the behaviour before tiling); tiles = 2:
    the excess of the four quadrants' noise errors, each computed alone, placed side by side."""
    size = tiny_model.image_size
    images = torch.rand(3, 3, 2 * size, 2 * size, generator=torch.Generator().manual_seed(2))
    cfg = RegimeConfig(adapt_steps=0)
    net, weights = tiny_model.net, tiny_model.calibration.weights

    def errors(x: torch.Tensor) -> torch.Tensor:
        return noise_error(tiny_model, net, *encode(tiny_model, to_model_size(x, size)))

    whole = excess_grid(errors(images), errors(images), weights)
    assert torch.equal(dzad_grids(tiny_model, images, None, cfg)[0], whole.cpu())
    corners = [(y, x) for y in (0, size) for x in (0, size)]
    crops = [img[:, y : y + size, x : x + size] for img in images for y, x in corners]
    q = errors(torch.stack(crops)).unflatten(0, (3, 4))  # one batch, as dzad_grids computes it
    spatial = torch.cat([torch.cat([q[:, 0], q[:, 1]], -1), torch.cat([q[:, 2], q[:, 3]], -1)], -2)
    tiled, info = dzad_grids(tiny_model, images, None, replace(cfg, dzad_tiles=2))
    assert info["dzad_tiles"] == 2 and tiled.shape == (3, *spatial.shape[-2:])
    assert tiled.shape[-1] == 2 * whole.shape[-1]
    torch.testing.assert_close(tiled, excess_grid(spatial, spatial, weights).cpu())


def test_reference_draw_is_seeded_and_from_train(synth_root):
    train = collect_samples(synth_root, ("grain",), ("train",))
    a, b = draw_references(train, 4, 0), draw_references(train, 4, 0)
    assert a == b and len(a) == 4
    assert draw_references(train, 4, 1) != a
    assert all(s.split == "train" and s.label == 0 for s in a)
    test = {s.path for s in collect_samples(synth_root, ("grain",), ("test",))}
    assert not test & {s.path for s in a}
    with pytest.raises(ValueError, match="grain/train/good: few-shot k"):  # names the folder
        draw_references(train, len(train) + 1, 0)


def test_seeded_groups_partition():
    groups = seeded_groups(10, 4, 0)
    assert [len(g) for g in groups] == [4, 3, 3]
    assert sorted(int(i) for g in groups for i in g) == list(range(10))
    assert [g.tolist() for g in groups] == [g.tolist() for g in seeded_groups(10, 4, 0)]
    assert len(seeded_groups(10, 0, 0)) == 1


@pytest.fixture()
def regime_params(tmp_path):
    p = tmp_path / "regime.yaml"
    p.write_text(
        "regime:\n  image_size: 32\n  degrees: [1, 3]\n  dzad_weight: 0.5\n  adapt_steps: 2\n"
        "  adapt_batch_size: 4\n  few_shot_draws: 2\n  group_size: 0\n"
    )
    return p


def test_evaluate_regimes_write_their_controls(
    tiny_checkpoint, synth_root, tmp_path, regime_params
):
    base = ["evaluate", "--model", str(tiny_checkpoint), "--data", str(synth_root)]
    base += ["--categories", "grain", "--random-backbone", "--regime-params", str(regime_params)]
    out = tmp_path / "batch"
    res = runner.invoke(app, [*base, "--out", str(out), "--batch-zero-shot", "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["regime"] == "batch zero-shot" and m["counts"]["grain"]["images"] == 10
    assert set(m["controls"]) == {"mutual"} and "grain" in m["categories"]
    assert {"backbone", "dzad"} <= set(m["variants"])
    out = tmp_path / "few"
    res = runner.invoke(app, [*base, "--out", str(out), "--few-shot", "4", "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["regime"] == "few-shot" and set(m["controls"]) == {"fewshot_patchcore"}
    assert not math.isnan(m["std"]["regime"]["grain"]["image_auroc"])
    both = runner.invoke(app, [*base, "--out", str(out), "--few-shot", "4", "--batch-zero-shot"])
    assert both.exit_code == 2
    bad = runner.invoke(
        app, [*base[:-1], str(tmp_path / "nope.yaml"), "--out", str(out), "--few-shot", "4"]
    )
    assert bad.exit_code == 2 and "nope.yaml" in bad.stderr


def test_score_regimes(tiny_checkpoint, synth_root, tmp_path, regime_params):
    test = synth_root / "grain" / "test"
    base = ["score", str(test), "--model", str(tiny_checkpoint), "--random-backbone"]
    base += ["--regime-params", str(regime_params), "--json", "--pictures"]
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--batch-zero-shot"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["regime"] == "batch zero-shot" and len(doc["rows"]) == 10
    assert all((tmp_path / "b" / r["heatmap"]).is_file() for r in doc["rows"])
    refs = synth_root / "grain" / "train" / "good"
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "f"), "--reference", str(refs)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["regime"] == "few-shot"
    missing = runner.invoke(
        app, [*base, "--out", str(tmp_path / "m"), "--reference", str(tmp_path / "nope")]
    )
    assert missing.exit_code == 2 and "nope" in missing.stderr


def test_real_profile_sets_the_real_image_configuration_and_overrides_win():
    from dzad.cli.model_cmds import train_config
    from dzad.config import PROFILE_SETTINGS, DZADConfig, flatten, load, with_profile
    from dzad.networks import PROFILES, resolve_profile
    from dzad.overrides import Overrides

    cfg = train_config(DZADConfig(), "real", ["noise.m_samples=2"], Overrides(steps=5))
    assert cfg.model.profile == "real" and cfg.train.steps == 5  # --steps beats the profile's 400
    assert cfg.noise.m_samples == 2  # --set beats the profile too
    cfg = train_config(DZADConfig(), "real", [], Overrides())
    assert (cfg.data.image_size, cfg.model.latent, cfg.model.feature_stride) == (
        128,
        "backbone_features",
        16,
    )
    assert (cfg.noise.m_samples, cfg.anomaly_map.base) == (4, "noise_excess")
    assert resolve_profile(cfg.model) == resolve_profile(with_profile(DZADConfig(), "demo").model)
    assert set(PROFILES) >= set(PROFILE_SETTINGS)
    # the profile is the `shared` study's training and map configuration, key for key
    shared = flatten(load("studies/shared.yaml"))
    real = flatten(with_profile(DZADConfig(), "real"))
    for section, values in PROFILE_SETTINGS["real"].items():
        if section != "regime":
            assert all(real[f"{section}.{k}"] == shared[f"{section}.{k}"] for k in values)
    assert with_profile(DZADConfig(), "demo") == replace(
        DZADConfig(), model=replace(DZADConfig().model, profile="demo")
    )


def test_a_test_only_target_gets_batch_zero_shot_alone(synth_root, tmp_path):
    """A study target without train/good (e.g. glass in the `shared` study) must not fail the
    regimes stage: few-shot is left out, batch zero-shot stays."""
    import shutil

    from dzad.config import DatasetRef
    from dzad.study.seed_regimes import REGIME_DIRS, runnable_regimes

    assert runnable_regimes(DatasetRef(str(synth_root), ("grain",))) == list(REGIME_DIRS)
    shutil.copytree(synth_root / "grain" / "test", tmp_path / "grain" / "test")
    shutil.copytree(synth_root / "weave", tmp_path / "weave")
    assert runnable_regimes(DatasetRef(str(tmp_path), ("weave",))) == list(REGIME_DIRS)
    assert runnable_regimes(DatasetRef(str(tmp_path), ())) == ["batch_zero_shot"]


def test_a_shared_memo_reuses_the_backbone_grids_and_changes_no_number(
    tiny_model, synth_root, tmp_path
):
    """The study scores every seed on the same images: the second call must not run the
    backbone at all (it raises here) and must give the first call's metrics exactly."""
    from dataclasses import replace as dc_replace

    from dzad.config import EvalConfig
    from dzad.evaluation import control_backbone
    from dzad.regime_evaluation import evaluate_regime

    rc = dc_replace(RegimeConfig(), image_size=32, degrees=(1, 3), few_shot_draws=2, group_size=6)
    backbone = control_backbone(tiny_model)

    class NoBackbone:
        strides, mean, name = backbone.strides, backbone.mean, backbone.name

        def __call__(self, x):
            raise AssertionError("backbone ran although its grids were in the memo")

    def run(b, out: str, k: int, memo: dict) -> dict:
        return evaluate_regime(
            tiny_model, b, synth_root, ["grain"], tmp_path / out, rc, EvalConfig(),
            few_shot=k, memo=memo,
        )  # fmt: skip

    for k in (0, 2):
        memo: dict = {}
        first = run(backbone, f"a{k}", k, memo)
        assert len(memo) == (2 if k == 0 else 4)  # 2 groups; 2 draws x (regime, PatchCore)
        assert run(NoBackbone(), f"b{k}", k, memo) == first


def test_the_regimes_subset_is_drawn_with_the_regime_seed(tiny_model, synth_root, tmp_path):
    """``max_images`` picks the same test images for every checkpoint (the study's seeds share
    them and their backbone grids), and another ``regime.seed`` picks another subset."""
    import pandas as pd

    from dzad.config import EvalConfig
    from dzad.evaluation import control_backbone
    from dzad.regime_evaluation import evaluate_regime

    rc = replace(RegimeConfig(), image_size=32, degrees=(1,), group_size=0)
    backbone = control_backbone(tiny_model)

    def paths(out: str, rc: RegimeConfig, model=tiny_model) -> list[str]:
        m = evaluate_regime(
            model, backbone, synth_root, ["grain"], tmp_path / out, rc,
            EvalConfig(max_images=5),
        )  # fmt: skip
        assert m["counts"]["grain"]["images"] == 5
        return sorted(pd.read_csv(tmp_path / out / "scores.csv")["path"])

    first = paths("a", rc)
    other_seed = tiny_model.with_settings(replace(tiny_model.cfg, seed=tiny_model.cfg.seed + 7))
    assert paths("b", rc, other_seed) == first
    assert paths("c", replace(rc, seed=3)) != first


def test_the_outlier_rule_needs_three_scores_and_score_refuses_fewer_on_auto(
    tiny_checkpoint, synth_root, tmp_path, regime_params
):
    for pair in torch.rand(20, 2) * torch.tensor([1.0, 100.0]):  # the higher of two, however close
        assert (pair > image_rule(pair).value).tolist() == (pair > pair.min()).tolist()
        assert not (pair[:1] > image_rule(pair[:1]).value).any()  # one: never
    close = torch.tensor([1.0, 1.001])
    assert (close > image_rule(close).value).tolist() == [False, True]
    three = torch.tensor([0.0, 0.01, 1.0])
    assert (three > image_rule(three).value).tolist() == [False, False, True]
    assert MIN_OUTLIER_SCORES == 3
    two = tmp_path / "two"
    two.mkdir()
    for f in sorted((synth_root / "grain" / "test").rglob("*.png"))[:2]:
        shutil.copy(f, two / f"{f.parent.name}_{f.name}")
    one_ref = tmp_path / "one_ref"
    one_ref.mkdir()
    goods = sorted((synth_root / "grain" / "train" / "good").glob("*.png"))
    shutil.copy(goods[0], one_ref / goods[0].name)
    base = ["score", str(two), "--model", str(tiny_checkpoint), "--random-backbone"]
    base += ["--regime-params", str(regime_params)]
    for regime in (["--batch-zero-shot"], ["--reference", str(one_ref)]):
        out = tmp_path / f"out{len(regime)}"
        refused = runner.invoke(app, [*base, *regime, "--out", str(out)])
        assert refused.exit_code == 2 and "needs at least 3 images (got 2)" in refused.stderr
        assert not out.exists()  # refused before anything is written
        numeric = runner.invoke(app, [*base, *regime, "--out", str(out), "--threshold", "0.5"])
        assert numeric.exit_code == 0, numeric.output
    shutil.copy(goods[1], one_ref / goods[1].name)  # two references: their own rule applies
    res = runner.invoke(app, [*base, "--reference", str(one_ref), "--out", str(tmp_path / "r2")])
    assert res.exit_code == 0, res.output
    batch_rule = tmp_path / "batch_rule.yaml"  # unless the batch rule is asked for
    batch_rule.write_text(regime_params.read_text() + "  few_shot_threshold: batch\n")
    args = [*base[:-1], str(batch_rule), "--reference", str(one_ref), "--out", str(tmp_path / "r3")]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "few_shot_threshold: batch" in refused.stderr
