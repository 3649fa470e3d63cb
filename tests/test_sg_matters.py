"""The SG network's hint is used once trained: eq. 9's condition is not ignored.

A fresh SG network adds exactly nothing (zero-initialised convolutions, tests/test_networks.py), so
any effect of the hint below comes from training. The `tiny` session checkpoint (30 steps, EMA 0.99)
moves the prediction by only ~1e-6 relative when the hint changes, so this file trains its own tiny
model briefly without EMA at a larger learning rate. Measured effects on 2 cores (relative L2 change
of eps at t = 500): zero hint ~3e-3, another image's hint ~3e-4; mean relative change of F ~5e-4.
The tolerances below are 5-10x under those and far above the exact zero that a disconnected SG
branch (or ``use_sg: false``) gives.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from dzad.detection import detect
from dzad.model import DZAD
from dzad.networks import build_network
from dzad.noise_features import noise_features

T_PROBE = (100, 500, 900)
TOL_ZERO_HINT = 5e-4  # relative L2 change of eps, trained net, real hint -> null (zero) hint
TOL_OTHER_HINT = 5e-5  # same, real hint -> another training image's hint
TOL_FEATURES = 5e-5  # mean relative change of F (B,N,M) and of the detection score


@pytest.fixture(scope="module", params=["image", pytest.param("latent", marks=pytest.mark.slow)])
def sg_model(request, tmp_path_factory, synth_root, tiny_config) -> tuple[DZAD, Tensor]:
    """A `tiny` model trained 40 steps on weave normals (lr 1e-2, no EMA) and 8 of its images;
    its SG hint is the image or the latent (``model.sg_hint``)."""
    from dzad.data.dataset import ImageDataset, iter_samples
    from dzad.training import train

    cfg = dataclasses.replace(
        tiny_config,
        model=dataclasses.replace(tiny_config.model, sg_hint=request.param),
        train=dataclasses.replace(tiny_config.train, steps=40, lr=1e-2, warmup_steps=2, ema=False),
    )
    assert cfg.model.use_sg
    ds = ImageDataset(list(iter_samples(synth_root, "weave", "train")), 32, cfg.data)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    out = tmp_path_factory.mktemp("sg_ckpt") / "tiny_sg"
    train(cfg, images, out, progress=False)
    return DZAD.from_checkpoint(out, random_backbone=True), images[:8]


def _noisy(model: DZAD, z0: Tensor, t: int) -> tuple[Tensor, Tensor]:
    """z_t (eq. 7) of ``z0`` ``(B,C,h,w)`` at timestep ``t`` with seeded noise; t ``(B,)``."""
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(t))
    ab = model.alphas_cumprod[t]
    return ab.sqrt() * z0 + (1 - ab).sqrt() * eps, torch.full((z0.shape[0],), t)


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


@torch.no_grad()
def test_trained_sg_prediction_depends_on_the_hint(sg_model):
    model, x = sg_model
    net = model.net.eval()
    z0 = model.encoder.encode(x)
    hint = net.hint(x, z0)
    assert hint is (z0 if model.cfg.model.sg_hint == "latent" else x)
    other = hint.roll(1, dims=0)  # every image gets another training image's hint
    for t in T_PROBE:
        z_t, tt = _noisy(model, z0, t)
        eps = net.predict_noise(z_t, tt, hint)
        assert torch.equal(eps, net.predict_noise(z_t, tt, hint))  # deterministic
        assert _rel(eps, net.predict_noise(z_t, tt, None)) > TOL_ZERO_HINT, t
        assert _rel(eps, net.predict_noise(z_t, tt, other)) > TOL_OTHER_HINT, t


@torch.no_grad()
def test_trained_sg_hint_changes_noise_features_and_detection_scores(sg_model):
    model, x = sg_model
    z0 = model.encoder.encode(x)
    args = (model.bank, model.alphas_cumprod, model.cfg.noise.max_batch)
    own = noise_features(model.net, z0, model.net.hint(x, z0), *args)
    null = noise_features(model.net, z0, None, *args)
    assert ((own.F - null.F).abs() / own.F.abs()).mean().item() > TOL_FEATURES
    s_own, _ = detect(own, model.calibration)
    s_null, _ = detect(null, model.calibration)
    assert ((s_own - s_null).abs() / s_own.abs().clamp_min(1e-6)).mean().item() > TOL_FEATURES


@torch.no_grad()
def test_without_sg_the_hint_has_no_effect(sg_model, tiny_config):
    model, x = sg_model
    cfg = dataclasses.replace(tiny_config.model, use_sg=False)
    torch.manual_seed(0)
    net = build_network(cfg, model.encoder.latent_channels, 16).eval()
    assert net.sg is None
    z0 = model.encoder.encode(x)
    for t in T_PROBE:
        z_t, tt = _noisy(model, z0, t)
        eps = net.predict_noise(z_t, tt, x)
        assert eps.abs().mean() > 0
        assert torch.equal(eps, net.predict_noise(z_t, tt, None))
        assert torch.equal(eps, net.predict_noise(z_t, tt, x.roll(1, dims=0)))
        assert torch.equal(eps, net.predict_noise(z_t, tt, torch.rand_like(x)))
