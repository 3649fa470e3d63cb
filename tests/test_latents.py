"""Encoders E: pixel, pixel-unshuffle, SD-shaped VAE (tiny, random) and backbone features."""

from __future__ import annotations

import pytest
import torch

from dzad.config import ModelConfig
from dzad.errors import DZADInputError
from dzad.latents import VAEEncoder, build_encoder, latent_downsample


def _images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_pixel_latent_is_images_in_minus_one_one():
    enc = build_encoder(ModelConfig(latent="pixel"), 32)
    x = _images()
    z = enc.encode(x)
    assert (enc.latent_channels, enc.downsample, enc.can_decode) == (3, 1, True)
    assert torch.allclose(z, 2 * x - 1) and z.min() >= -1 and z.max() <= 1
    assert torch.allclose(enc.decode(z), x, atol=1e-6)
    assert enc.latent_range() == (-1.0, 1.0)


def test_pixel_unshuffle_is_lossless_space_to_depth():
    enc = build_encoder(ModelConfig(latent="pixel_unshuffle", unshuffle_factor=4), 32)
    x = _images()
    z = enc.encode(x)
    assert z.shape == (3, 48, 8, 8) and enc.latent_channels == 48
    # channel c*16 + i*4 + j of latent pixel (p, q) is image pixel (4p+i, 4q+j) of channel c
    assert torch.allclose(z[:, 1 * 16 + 2 * 4 + 3, 1, 2], 2 * x[:, 1, 4 + 2, 8 + 3] - 1)
    assert torch.allclose(enc.decode(z), x, atol=1e-6)


def test_image_size_must_divide_by_the_latent_factor():
    with pytest.raises(ValueError, match="not divisible"):
        build_encoder(ModelConfig(latent="pixel_unshuffle", unshuffle_factor=4), 30)


def test_vae_latent_is_scaled_posterior_mean_and_round_trips_through_save_pretrained(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(profile="tiny", latent="vae", random_vae=True), 32)
    assert isinstance(enc, VAEEncoder)
    assert (enc.latent_channels, enc.downsample) == (4, 8)
    assert latent_downsample(ModelConfig(latent="vae")) == enc.downsample
    x = _images()
    z = enc.encode(x)
    assert z.shape == (3, 4, 4, 4)
    mean = enc.vae.encode(2 * x - 1).latent_dist.mean
    assert torch.allclose(z, mean * 0.18215, atol=1e-6)
    assert torch.equal(z, enc.encode(x))  # deterministic: the mean, not a sample
    assert enc.decode(z).shape == x.shape
    assert not any(p.requires_grad for p in enc.parameters())
    assert enc.latent_range() is None  # not measured yet
    enc.fit([x[:2], x[2:]])
    assert enc.latent_range() == pytest.approx((z.min().item(), z.max().item()))
    assert enc.extra_state()["range"].tolist() == pytest.approx(list(enc.latent_range()))
    enc.vae.save_pretrained(tmp_path / "vae")
    loaded = build_encoder(ModelConfig(profile="tiny", latent="vae", vae=str(tmp_path / "vae")), 32)
    assert torch.allclose(loaded.encode(x), z, atol=1e-6)
    # a diffusers folder given as `pretrained` is read from its vae/ subfolder
    sub = build_encoder(ModelConfig(profile="tiny", latent="vae", pretrained=str(tmp_path)), 32)
    assert torch.allclose(sub.encode(x), z, atol=1e-6)


def test_vae_needs_a_source_and_reports_a_bad_folder(tmp_path):
    with pytest.raises(ValueError, match=r"model\.vae"):
        build_encoder(ModelConfig(latent="vae"), 32)
    with pytest.raises(DZADInputError, match="AutoencoderKL"):
        build_encoder(ModelConfig(latent="vae", vae=str(tmp_path / "nope")), 32)


def _feature_cfg(**kw) -> ModelConfig:
    pytest.importorskip("dzad.backbones")
    return ModelConfig(latent="backbone_features", random_backbone=True, latent_channels=8, **kw)


def test_backbone_features_are_standardised_pca_fitted_on_source_only():
    cfg = _feature_cfg()
    torch.manual_seed(0)
    enc = build_encoder(cfg, 32)
    assert (enc.latent_channels, enc.downsample, enc.can_decode) == (8, 8, False)
    x = _images(6, 32)
    with pytest.raises(RuntimeError, match="fit"):
        enc.encode(x)
    enc.fit([x[:3], x[3:]])
    z = enc.encode(x)
    assert z.shape == (6, 8, 4, 4)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8).double()
    assert flat.mean(0).abs().max() < 1e-3  # centred on the fit data
    assert abs(flat.var(0).mean().item() - 1) < 0.05  # one global scale: mean variance 1
    assert (flat.var(0)[:-1] >= flat.var(0)[1:] - 1e-6).all()  # principal axes, descending
    corr = torch.corrcoef(flat.T)
    assert (corr - torch.eye(8, dtype=corr.dtype)).abs().max() < 1e-3  # decorrelated
    with pytest.raises(NotImplementedError):
        enc.decode(z)
    low, high = enc.latent_range()  # measured on the fit (SOURCE) images
    assert (low, high) == pytest.approx((z.min().item(), z.max().item()), abs=1e-5)
    # fitted statistics travel as extra state: a fresh encoder given them encodes identically
    torch.manual_seed(123)  # the (random, test-only) backbone does not depend on the global RNG
    fresh = build_encoder(cfg, 32)
    fresh.load_extra_state(enc.extra_state())
    assert torch.allclose(fresh.encode(x), z, atol=1e-5)
    assert fresh.latent_range() == enc.latent_range()


def test_backbone_features_whitening_gives_unit_variance_per_axis():
    torch.manual_seed(0)
    enc = build_encoder(_feature_cfg(pca_whiten=True), 32)
    x = _images(6, 32)
    enc.fit([x])
    flat = enc.encode(x).permute(0, 2, 3, 1).reshape(-1, 8).double()
    assert torch.allclose(flat.var(0), torch.ones(8, dtype=flat.dtype), atol=1e-3)


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (ModelConfig(latent="pixel"), (3, 32, 32)),
        (ModelConfig(latent="pixel_unshuffle", unshuffle_factor=2), (12, 16, 16)),
        (ModelConfig(profile="tiny", latent="vae", random_vae=True), (4, 4, 4)),
        ("features", (8, 4, 4)),
    ],
)
def test_latent_shape_is_the_shape_encode_gives(model, shape):
    cfg = _feature_cfg(feature_stride=8) if model == "features" else model
    torch.manual_seed(0)
    enc = build_encoder(cfg, 32)
    x = _images(n=2)
    enc.fit([x])
    assert enc.latent_shape(32) == shape == tuple(enc.encode(x).shape[1:])
