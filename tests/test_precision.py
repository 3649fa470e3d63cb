"""noise.precision: calibration and scoring forwards in one precision (dzad.precision)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scipy.stats import spearmanr

from dzad.calibration import calibrate_on_source, split_holdout
from dzad.config import MapConfig, TrainConfig
from dzad.data.dataset import ImageDataset, iter_samples
from dzad.data.source import ImageSource
from dzad.model import DZAD
from dzad.precision import resolve_precision
from dzad.training import train


def _images(synth_root, cfg, categories: tuple[str, ...], split: str) -> torch.Tensor:
    samples = [s for c in categories for s in iter_samples(synth_root, c, split)]
    ds = ImageDataset(samples, cfg.data.image_size, cfg.data)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


def _recalibrated(model: DZAD, precision: str, source: torch.Tensor) -> DZAD:
    """The same trained parts, calibrated (as training calibrates) in ``precision``."""
    cfg = dataclasses.replace(
        model.cfg, noise=dataclasses.replace(model.cfg.noise, precision=precision)
    )
    d = cfg.detection
    _, cal_idx = split_holdout(len(source), d.calibration_holdout, d.calibration_max_images, 0)
    calib = calibrate_on_source(
        cfg, model.net, model.encoder, model.bank, model.alphas_cumprod, ImageSource(source),
        cal_idx, torch.device("cpu"), backbone=model.backbone,
    )  # fmt: skip
    return DZAD(cfg, model.encoder, model.net, model.bank, calib, model.backbone)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_root, tiny_config):
    """A `tiny` model trained 200 steps on weave (the 30-step session checkpoint has barely moved
    from F ~ 1, where stage spreads are 0.02 % of F and any rounding reorders images) and its
    SOURCE normals; fp32 calibration (``auto`` on CPU)."""
    cfg = dataclasses.replace(
        tiny_config,
        train=TrainConfig(steps=200, batch_size=8, lr=1e-3, warmup_steps=5, checkpoint_every=0,
                          device="cpu"),
        anomaly_map=MapConfig(random_backbone=True),
    )  # fmt: skip
    source = _images(synth_root, cfg, ("weave",), "train")
    out = tmp_path_factory.mktemp("precision") / "tiny200"
    train(cfg, source, out, progress=False)
    return DZAD.from_checkpoint(out), source


def test_auto_is_fp32_on_cpu_and_bf16_can_be_forced():
    assert resolve_precision("auto", "cpu") == torch.float32
    assert resolve_precision("fp32", "cpu") == torch.float32
    assert resolve_precision("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match=r"noise\.precision"):
        resolve_precision("fp16", "cpu")


@pytest.mark.slow
def test_bf16_scores_rank_like_fp32_scores(trained, synth_root):
    """The bf16 parity bar (method.md §11.2): Spearman >= 0.99 between bf16 (forced on CPU,
    calibrated in bf16) and fp32 scores of the weave and grain test images."""
    model, source = trained
    x = _images(synth_root, model.cfg, ("weave", "grain"), "test")
    fp32 = model(x)
    bf16 = _recalibrated(model, "bf16", source)(x)
    for name in ("detection_score", "map_score"):
        a, b = getattr(fp32, name), getattr(bf16, name)
        assert b.dtype == torch.float32
        assert not torch.equal(a, b), f"{name}: bf16 changed nothing"  # autocast took effect
        assert spearmanr(a.numpy(), b.numpy()).statistic >= 0.99, name


@pytest.mark.slow
def test_calibration_statistics_come_from_the_scoring_arithmetic(trained):
    """The per-stage SOURCE means of a bf16 calibration are exactly the bf16 scoring path's mean
    F of the same held-out images (an fp32 calibration differs from it: not the same numbers)."""
    model, source = trained
    bf16 = _recalibrated(model, "bf16", source)
    d = model.cfg.detection
    _, cal_idx = split_holdout(len(source), d.calibration_holdout, d.calibration_max_images, 0)
    assert len(cal_idx) <= model.cfg.evaluate.batch_size  # one batch, as calibration runs it
    scored = bf16.features(source[cal_idx]).F.mean(2).mean(0)  # (N,)
    torch.testing.assert_close(bf16.calibration.stage_mean, scored, rtol=0, atol=1e-6)
    fp32_mean = model.calibration.stage_mean
    assert (fp32_mean - scored).abs().max() > 1e-6
