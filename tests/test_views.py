"""Test-time views (``noise.views``): flipped copies of each image, their noise features averaged
with every spatial error flipped back, the same in calibration and in scoring."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dzad.calibration import calibrate_on_source
from dzad.config import NoiseConfig
from dzad.data.dataset import ImageDataset, iter_samples
from dzad.data.source import ImageSource
from dzad.latents import PixelEncoder
from dzad.model import DZAD
from dzad.noise_features import (
    NoiseBank,
    NoiseFeatures,
    average_views,
    encode_views,
    flip_view,
    noise_features,
    view_features,
)

FOUR = ("identity", "hflip", "vflip", "hvflip")
_encode = PixelEncoder().encode  # x -> 2x - 1


@pytest.fixture(scope="module")
def setup(net, alphas):
    """conftest's `net` (its SG "trained", so the hint and its orientation matter)."""
    bank = NoiseBank.create(NoiseConfig(n_stages=3, m_samples=2, seed=5), 100, (3, 8, 8))
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    return net, bank, alphas, x


def test_flips_are_their_own_inverse_and_unknown_views_are_named():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    assert torch.equal(flip_view(x, "identity"), x)
    assert torch.equal(flip_view(x, "hflip")[..., 0], x[..., -1])
    assert torch.equal(flip_view(x, "vflip")[..., 0, :], x[..., -1, :])
    assert torch.equal(flip_view(x, "hvflip"), x.flip(-1).flip(-2))
    for v in FOUR:
        assert torch.equal(flip_view(flip_view(x, v), v), x)
    with pytest.raises(ValueError, match=r"unknown view 'rot90'.*hflip"):
        flip_view(x, "rot90")


def test_average_flips_each_spatial_error_back_before_averaging():
    base = torch.rand(2, 3, 4, 4)
    # each view's map is the base map seen in that view: flipped back, all four are the base
    parts = [
        NoiseFeatures(torch.full((2, 3, 1), float(i)), flip_view(base, v))
        for i, v in enumerate(FOUR)
    ]
    out = average_views(parts, FOUR)
    torch.testing.assert_close(out.spatial, base)
    torch.testing.assert_close(out.F, torch.full((2, 3, 1), 1.5))
    with pytest.raises(ValueError, match="one NoiseFeatures per view"):
        average_views(parts[:2], FOUR)


def test_identity_view_is_the_plain_noise_features(setup):
    net, bank, ab, x = setup
    plain = noise_features(net, _encode(x), x, bank, ab, 64)
    one = view_features(net, encode_views(_encode, x, ("identity",)), bank, ab, 64)
    assert torch.equal(one.F, plain.F) and torch.equal(one.spatial, plain.spatial)


def test_views_average_the_flipped_images_features(setup):
    net, bank, ab, x = setup
    views = ("identity", "hflip")
    viewed = encode_views(_encode, x, views)
    out = view_features(net, viewed, bank, ab, 64)
    a = noise_features(net, _encode(x), x, bank, ab, 64)
    xf = x.flip(-1)
    b = noise_features(net, _encode(xf), xf, bank, ab, 64)
    torch.testing.assert_close(out.F, (a.F + b.F) / 2)
    torch.testing.assert_close(out.spatial, (a.spatial + b.spatial.flip(-1)) / 2)
    assert not torch.allclose(out.F, a.F)  # the flipped view is not a copy of the identity
    null = view_features(net, viewed, bank, ab, 64, null_hint=True)
    assert not torch.allclose(null.F, out.F)  # the hint is still given (flipped) per view


@pytest.fixture(scope="module")
def images(synth_root, tiny_config):
    samples = list(iter_samples(synth_root, "weave", "train"))[:6]
    ds = ImageDataset(samples, tiny_config.data.image_size, tiny_config.data)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


def test_calibration_and_scoring_use_the_same_views(tiny_model, images):
    """With views, the pipeline's detection score is eq. 13 of the view-averaged features, and
    the calibration (stage statistics, tau, per-position statistics) is fitted on view-averaged
    SOURCE features too, so a threshold never compares one view's score with four views'."""
    cfg = dataclasses.replace(
        tiny_model.cfg, noise=dataclasses.replace(tiny_model.cfg.noise, views=FOUR)
    )
    m = tiny_model
    normals = ImageSource(images, 64)
    idx = torch.arange(len(images))
    calib = calibrate_on_source(
        cfg, m.net, m.encoder, m.bank, m.alphas_cumprod, normals, idx, torch.device("cpu"),
        backbone=m.backbone,
    )  # fmt: skip
    model = DZAD(cfg, m.encoder, m.net, m.bank, calib, m.backbone)
    viewed = encode_views(m.encoder.encode, images, FOUR)
    feats = view_features(m.net, viewed, m.bank, m.alphas_cumprod, cfg.noise.max_batch)
    stage = feats.F.mean(2)
    torch.testing.assert_close(calib.stage_mean, stage.mean(0))
    torch.testing.assert_close(calib.position_mean, feats.spatial.mean(0))  # all 6 normals
    det = model.features(images)
    torch.testing.assert_close(det.F, feats.F)
    torch.testing.assert_close(det.spatial, feats.spatial)
    plain = tiny_model.features(images)
    assert not torch.allclose(det.detection_score, plain.detection_score)
