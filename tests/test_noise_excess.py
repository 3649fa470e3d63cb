"""The noise-excess map (anomaly_map.base = noise_excess): per-position SOURCE statistics, the
excess itself, and the pipeline path that skips the reconstruction."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dzad.model
from dzad.anomaly_map import excess_term, scaled, smooth
from dzad.calibration import position_subset
from dzad.data.dataset import ImageDataset, iter_samples
from dzad.data.source import ImageSource
from dzad.detection import Calibration, calibrate, excess_map
from dzad.model import DZAD
from dzad.noise_features import NoiseFeatures
from tests.helpers import with_map


def _calibration(n: int = 3, h: int = 4) -> Calibration:
    mean = torch.arange(n * h * h, dtype=torch.float32).view(n, h, h) / 10
    return Calibration(
        stage_mean=torch.zeros(n),
        stage_std=torch.ones(n),
        tau=0.0,
        weights=torch.tensor([0.5, 0.3, 0.2][:n]),
        normal_spatial=torch.zeros(0),
        normal_keys=torch.zeros(0),
        position_mean=mean,
        position_std=torch.full((n, h, h), 2.0),
    )


def test_excess_counts_only_errors_above_the_source_normals_at_that_position():
    calib = _calibration()
    spatial = calib.position_mean.clone().unsqueeze(0).repeat(2, 1, 1, 1)  # (2,N,h,w)
    spatial[1] -= 5.0  # everywhere below the normals: no excess
    spatial[0, 1, 2, 3] += 3 * 2.0  # stage 1, position (2,3): 3 std above its own mean
    out = excess_map(spatial, calib)
    assert out.shape == (2, 4, 4)
    expected = torch.zeros(2, 4, 4)
    expected[0, 2, 3] = 0.3 * 3.0**2  # w_1 * z^2
    torch.testing.assert_close(out, expected)


def test_excess_is_relative_to_each_position_not_the_stage_mean():
    calib = _calibration()
    # one map with the SOURCE positional pattern itself plus 1: same excess everywhere, although
    # the raw errors differ across positions
    spatial = (calib.position_mean + 2.0).unsqueeze(0)
    out = excess_map(spatial, calib)
    torch.testing.assert_close(out, torch.full((1, 4, 4), float(calib.weights.sum())))


def test_excess_needs_position_statistics_of_the_right_shape():
    calib = dataclasses.replace(_calibration(), position_mean=None, position_std=None)
    with pytest.raises(ValueError, match="per-position SOURCE statistics"):
        excess_map(torch.zeros(1, 3, 4, 4), calib)
    with pytest.raises(ValueError, match="position statistics"):
        excess_map(torch.zeros(1, 3, 5, 5), _calibration())


def test_calibrate_stores_per_stage_per_position_statistics(tiny_config):
    g = torch.Generator().manual_seed(0)
    normal = NoiseFeatures(torch.rand(6, 3, 2, generator=g), torch.rand(6, 3, 4, 4, generator=g))
    position = NoiseFeatures(torch.rand(9, 3, 2, generator=g), torch.rand(9, 3, 4, 4, generator=g))
    ac = torch.linspace(0.99, 0.01, 1000)
    d = tiny_config.detection
    calib = calibrate(normal, tiny_config.weighting, d, ac, features_position=position)
    torch.testing.assert_close(calib.position_mean, position.spatial.mean(0))
    torch.testing.assert_close(calib.position_std, position.spatial.std(0))
    back = Calibration.from_tensors(calib.to_tensors(), calib.to_meta())
    torch.testing.assert_close(back.position_std, calib.position_std)
    assert calibrate(normal, tiny_config.weighting, d, ac).position_mean is None


def test_position_subset_is_seeded_and_capped(tiny_config):
    cfg = dataclasses.replace(
        tiny_config, detection=dataclasses.replace(tiny_config.detection, position_images=5)
    )
    a = position_subset(20, cfg)
    assert len(a) == 5 and len(set(a.tolist())) == 5
    assert torch.equal(a, position_subset(20, cfg))
    assert not torch.equal(a, position_subset(20, dataclasses.replace(cfg, seed=cfg.seed + 1)))
    assert torch.equal(position_subset(3, cfg), torch.arange(3))


@pytest.fixture(scope="module")
def images(synth_root, tiny_config):
    samples = list(iter_samples(synth_root, "grain", "test"))[:4]
    ds = ImageDataset(samples, tiny_config.data.image_size, tiny_config.data)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


def test_session_checkpoint_has_position_statistics(tiny_model):
    calib = tiny_model.calibration
    n, h = tiny_model.bank.n_stages, tiny_model.bank.noise.shape[-1]
    assert calib.position_mean.shape == calib.position_std.shape == (n, h, h)
    assert (calib.position_std > 0).all()


def test_noise_excess_forward_is_the_gated_excess_without_reconstruction(
    tiny_model, images, monkeypatch
):
    model = with_map(tiny_model, base="noise_excess")

    def no_reconstruction(*args, **kwargs):
        raise AssertionError("the noise-excess map must not reconstruct")

    monkeypatch.setattr(dzad.model, "reconstruct", no_reconstruction)
    out = model(images)
    # the same map by hand from the features: excess / gate, smoothed
    det = model.features(images)
    calib, size = model.calibration, tuple(images.shape[-2:])
    raw = excess_term(excess_map(det.spatial, calib), size, model.gate(det, size))
    expected = smooth(raw, scaled(model.cfg.anomaly_map.sigma, size[0]))
    torch.testing.assert_close(out.anomaly_map, expected)
    assert (out.anomaly_map >= 0).all() and out.anomaly_map.amax() > 0
    torch.testing.assert_close(out.detection_score, det.detection_score)


def test_reconstruction_base_still_reconstructs(tiny_model, images, monkeypatch):
    calls = []
    real = dzad.model.reconstruct
    monkeypatch.setattr(dzad.model, "reconstruct", lambda *a, **k: calls.append(1) or real(*a, **k))
    tiny_model(images[:1])
    assert calls == [1]


def test_calibration_without_position_images_has_no_statistics(tiny_model, images):
    from dzad.calibration import calibrate_on_source

    cfg = dataclasses.replace(
        tiny_model.cfg,
        detection=dataclasses.replace(tiny_model.cfg.detection, position_images=0),
    )
    normals = ImageSource(images, 64)
    calib = calibrate_on_source(
        cfg, tiny_model.net, tiny_model.encoder, tiny_model.bank, tiny_model.alphas_cumprod,
        normals, torch.arange(len(images)), torch.device("cpu"), backbone=tiny_model.backbone,
    )  # fmt: skip
    assert calib.position_mean is None
    bare = DZAD(
        cfg, tiny_model.encoder, tiny_model.net, tiny_model.bank, calib, tiny_model.backbone
    )
    with pytest.raises(ValueError, match="per-position SOURCE statistics"):
        with_map(bare, base="noise_excess")(images[:1])
