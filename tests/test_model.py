"""The DZAD pipeline: forward wiring, batch invariance, two-branch gating in place, checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dzad.calibration import split_holdout
from dzad.data.dataset import ImageDataset, iter_samples
from dzad.errors import CheckpointError
from dzad.model import DZAD
from dzad.reconstruction import image_seeds, reconstruct
from dzad.scoring import rank_fusion
from tests.helpers import with_map


@pytest.fixture(scope="module")
def test_images(synth_root, tiny_config):
    samples = list(iter_samples(synth_root, "grain", "test"))[:6]
    ds = ImageDataset(samples, tiny_config.data.image_size, tiny_config.data)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


@pytest.fixture(scope="module")
def output(tiny_model, test_images):
    return tiny_model(test_images)


def test_forward_shapes_and_decision_rule(tiny_model, test_images, output):
    b, n, m = len(test_images), tiny_model.bank.n_stages, tiny_model.bank.m_samples
    assert output.anomaly_map.shape == (b, 1, 32, 32)
    assert output.F.shape == (b, n, m)
    assert torch.isfinite(output.anomaly_map).all() and (output.anomaly_map >= 0).all()
    tau = tiny_model.calibration.tau
    assert torch.equal(output.decision, output.detection_score > tau)
    torch.testing.assert_close(output.image_score, output.map_score)  # default fusion: map
    # the map score is the pooled max of the returned map, never above its maximum
    assert (output.map_score <= output.anomaly_map.flatten(1).amax(1) + 1e-6).all()


def test_features_only_path_matches_forward(tiny_model, test_images, output):
    det = tiny_model.features(test_images)
    torch.testing.assert_close(det.F, output.F)
    torch.testing.assert_close(det.detection_score, output.detection_score)
    assert det.spatial.shape[:2] == output.F.shape[:2]


def test_batch_composition_does_not_change_results(tiny_model, test_images, output):
    for i in (4, 1):
        one = tiny_model(test_images[i : i + 1])
        torch.testing.assert_close(one.anomaly_map[0], output.anomaly_map[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            one.detection_score[0], output.detection_score[i], atol=1e-4, rtol=1e-4
        )


def test_two_branch_gate_in_the_pipeline(tiny_model, test_images, output):
    tau = float(output.detection_score.median())  # both branches present, whatever the training
    none = with_map(tiny_model, tau, gating="none")(test_images)
    gated = with_map(tiny_model, tau, gating="spatial", w_pn=3.0, w_pa_floor=0.01)(test_images)
    normal, anomalous = ~gated.decision, gated.decision
    assert normal.any() and anomalous.any()
    diff = gated.anomaly_map - none.anomaly_map
    # eq. 14 pulls detected-normal maps down; eq. 15 raises detected-anomalous maps, never lowers
    assert (diff[normal] <= 1e-6).all() and diff[normal].min() < 0
    assert (diff[anomalous] >= -1e-6).all() and diff[anomalous].max() > 0
    scalar = with_map(tiny_model, tau, gating="scalar", w_pn=3.0)(test_images)
    torch.testing.assert_close(scalar.anomaly_map[normal], gated.anomaly_map[normal])


def test_fusion_option_selects_the_image_score(tiny_model, test_images, output):
    det = with_map(tiny_model, fusion="detection")(test_images)
    torch.testing.assert_close(det.image_score, output.detection_score)
    rank = with_map(tiny_model, fusion="rank")(test_images)
    torch.testing.assert_close(rank.image_score, rank.fused_score)
    assert ((rank.fused_score > 0) & (rank.fused_score < 1)).all()


def test_fusion_ranks_against_the_held_out_source_normals(tiny_checkpoint, tiny_config, synth_root):
    model = DZAD.from_checkpoint(tiny_checkpoint)  # the backbone the calibration used
    assert model.reference_problem() is None
    calib = model.calibration
    # the references are the pipeline's own scores of the SOURCE normals held out of training
    samples = list(iter_samples(synth_root, "weave", "train"))
    ds = ImageDataset(samples, tiny_config.data.image_size, tiny_config.data)
    d = tiny_config.detection
    _, cal_idx = split_holdout(
        len(ds), d.calibration_holdout, d.calibration_max_images, tiny_config.seed
    )
    held = torch.stack([ds[int(i)]["image"] for i in cal_idx])
    out = model(held)
    torch.testing.assert_close(calib.ref_map, out.map_score, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(calib.ref_detection, out.detection_score, atol=1e-5, rtol=1e-4)
    # so one image's fused score is its rank among them, whatever else is in the batch
    test = torch.stack([ds[i]["image"] for i in range(3)])
    batch = model(test)
    want = rank_fusion(batch.map_score, batch.detection_score, calib.ref_map, calib.ref_detection)
    torch.testing.assert_close(batch.fused_score, want)
    one = model(test[2:3])
    torch.testing.assert_close(one.fused_score[0], batch.fused_score[2], atol=1e-4, rtol=1e-4)
    # other map settings than at calibration: the references are not used, and that is said
    other = with_map(model, sigma=1.0)
    assert "differ" in other.reference_problem() and other.fusion_references() is None


def test_save_and_reload_reproduce_outputs(tiny_model, test_images, output, tmp_path):
    tiny_model.save(tmp_path / "copy")
    again = DZAD.from_checkpoint(tmp_path / "copy", random_backbone=True)
    out = again(test_images)
    torch.testing.assert_close(out.detection_score, output.detection_score)
    torch.testing.assert_close(out.anomaly_map, output.anomaly_map)  # seeded random backbone
    assert torch.equal(out.decision, output.decision)


def test_uncalibrated_or_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        DZAD.from_checkpoint(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dzad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        DZAD.from_checkpoint(tmp_path / "bad")


@pytest.mark.slow  # trains its own backbone-features model; the map math: test_anomaly_map.py
def test_latent_without_decoder_uses_latent_distances(tmp_path, caplog):
    from dzad.config import (
        DataConfig,
        DetectionConfig,
        DZADConfig,
        ModelConfig,
        NoiseConfig,
        TrainConfig,
    )
    from dzad.training import train

    cfg = DZADConfig(
        data=DataConfig(image_size=32),
        model=ModelConfig(
            profile="tiny", latent="backbone_features", random_backbone=True, latent_channels=16
        ),
        train=TrainConfig(steps=3, batch_size=8, warmup_steps=1, checkpoint_every=0, device="cpu"),
        noise=NoiseConfig(n_stages=4, m_samples=1, max_batch=64),
        detection=DetectionConfig(calibration_holdout=0.25, gating_bank_size=8),
    )
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    train(cfg, images, tmp_path / "ck", progress=False)
    with caplog.at_level("WARNING", logger="dzad.model"):
        model = DZAD.from_checkpoint(tmp_path / "ck")
    assert model.backbone is None and not model.encoder.can_decode  # never decoded
    assert "not clamped" not in caplog.text
    # x0-predictions are clamped to the SOURCE latent range stored in the checkpoint, which keeps
    # the near-untrained net's DDIM reconstruction bounded (unclamped it diverges)
    lo, hi = model.encoder.latent_range()
    assert model.clamp_range == (lo, hi) and lo < 0 < hi
    x = images[:3]
    z0 = model.encoder.encode(x)
    for clamp in (True, False):
        rc = dataclasses.replace(model.cfg.reconstruction, clamp=clamp)
        args = (model.net, z0, x, rc, cfg.model.num_train_timesteps)
        z = reconstruct(
            *args, clamp_range=model.clamp_range, alphas_cumprod=model.alphas_cumprod,
            seeds=image_seeds(x, 0),
        )  # fmt: skip
        inside = bool(z.min() >= lo - 1e-4) and bool(z.max() <= hi + 1e-4)
        assert inside == clamp
    cosine = model(images[:3])
    assert cosine.anomaly_map.shape == (3, 1, 32, 32) and torch.isfinite(cosine.anomaly_map).all()
    l2 = with_map(model, latent_distance="l2")(images[:3])
    assert not torch.allclose(l2.anomaly_map, cosine.anomaly_map)


def test_with_settings_builds_a_checked_model_on_the_same_weights(tiny_model, test_images, output):
    trained = tiny_model.cfg
    cfg = dataclasses.replace(
        trained, anomaly_map=dataclasses.replace(trained.anomaly_map, fusion="detection")
    )
    other = tiny_model.with_settings(cfg)
    assert other is not tiny_model and other.cfg == cfg and tiny_model.cfg is trained
    assert other.net is tiny_model.net and other.calibration is tiny_model.calibration
    assert torch.equal(other(test_images).image_score, output.detection_score)
    with pytest.raises(AttributeError):
        tiny_model.cfg = cfg  # a built model is never changed in place
    vae = dataclasses.replace(trained, model=dataclasses.replace(trained.model, latent="vae"))
    with pytest.raises(ValueError, match="another `model` section"):
        tiny_model.with_settings(vae)
    bank = dataclasses.replace(trained, noise=dataclasses.replace(trained.noise, n_stages=2))
    with pytest.raises(ValueError, match="another noise bank"):
        tiny_model.with_settings(bank)
    # __init__'s own checks run too: tests/test_detection_modes.py (mode vs calibration)
