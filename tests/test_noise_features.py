"""Multi-timestep noise features (eq. 11-12): bucket-centred bank, common noise, batching."""

from __future__ import annotations

import math

import pytest
import torch

from dzad.config import NoiseConfig
from dzad.noise_features import NoiseBank, noise_features, sg_residual_means

NOISE = NoiseConfig(n_stages=4, m_samples=2, seed=7, max_batch=64)


def _data(b: int = 3, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 8, 8, generator=g)
    return 2 * x - 1, x


def test_bank_timesteps_are_bucket_centred():
    bank = NoiseBank.create(NoiseConfig(n_stages=10, m_samples=1), 1000, (3, 8, 8))
    assert bank.timesteps[:, 0].tolist() == [50 + 100 * n for n in range(10)]
    bank = NoiseBank.create(NoiseConfig(n_stages=4, m_samples=2), 1000, (3, 8, 8))
    expect = [[math.floor(n * 250 + (m + 0.5) * 125) for m in range(2)] for n in range(4)]
    assert bank.timesteps.tolist() == expect
    for n in range(4):  # every sample lies in its bucket [nT/N, (n+1)T/N)
        assert ((bank.timesteps[n] >= n * 250) & (bank.timesteps[n] < (n + 1) * 250)).all()
    assert bank.noise.shape == (4, 2, 3, 8, 8)


def test_bank_is_seeded():
    a = NoiseBank.create(NoiseConfig(seed=1), 1000, (3, 4, 4))
    b = NoiseBank.create(NoiseConfig(seed=1), 1000, (3, 4, 4))
    c = NoiseBank.create(NoiseConfig(seed=2), 1000, (3, 4, 4))
    assert torch.equal(a.noise, b.noise) and not torch.equal(a.noise, c.noise)
    assert torch.equal(NoiseBank.from_tensors(a.to_tensors()).noise, a.noise)


def test_shapes_and_entry_formula(net, alphas):
    bank = NoiseBank.create(NOISE, 100, (3, 8, 8))
    z0, x = _data()
    f = noise_features(net, z0, x, bank, alphas, 64)
    assert f.F.shape == (3, 4, 2) and f.spatial.shape == (3, 4, 8, 8)
    # eq. 12 by hand for image 1, stage 2, sample 1
    t = bank.timesteps[2, 1]
    eps = bank.noise[2, 1][None]
    ab = alphas[t]
    z_t = ab.sqrt() * z0[1:2] + (1 - ab).sqrt() * eps
    with torch.no_grad():
        pred = net.predict_noise(z_t, t[None], x[1:2])
    assert torch.allclose(f.F[1, 2, 1], (eps - pred).pow(2).mean(), atol=1e-6)
    # spatial map: mean over C and M; its spatial mean is the mean over M of F
    assert torch.allclose(f.spatial.mean((2, 3)), f.F.mean(2), atol=1e-6)


def test_common_random_numbers_make_scores_reproducible(net, alphas):
    bank = NoiseBank.create(NOISE, 100, (3, 8, 8))
    z0, x = _data()
    twice = noise_features(net, z0[[0, 0]], x[[0, 0]], bank, alphas, 64)
    assert torch.allclose(twice.F[0], twice.F[1], atol=1e-6)  # same image -> same F
    again = noise_features(net, z0, x, bank, alphas, 64)
    assert torch.allclose(again.F[0], twice.F[0], atol=1e-6)
    other = NoiseBank.create(NoiseConfig(n_stages=4, m_samples=2, seed=8), 100, (3, 8, 8))
    assert not torch.allclose(noise_features(net, z0, x, other, alphas, 64).F, again.F)


def test_evaluations_are_batched(net, alphas):
    bank = NoiseBank.create(NOISE, 100, (3, 8, 8))
    z0, x = _data(b=3)
    calls = []
    handle = net.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        chunked = noise_features(net, z0, x, bank, alphas, max_batch=5)
        assert len(calls) == math.ceil(3 * 8 / 5) and sum(calls) == 24
        calls.clear()
        whole = noise_features(net, z0, x, bank, alphas, max_batch=24)
        assert calls == [24]
    finally:
        handle.remove()
    assert torch.allclose(chunked.F, whole.F, atol=1e-5)
    assert torch.allclose(chunked.spatial, whole.spatial, atol=1e-5)


def test_null_hint_and_given_residuals(net, alphas):
    bank = NoiseBank.create(NOISE, 100, (3, 8, 8))
    z0, x = _data(b=2)
    with_hint = noise_features(net, z0, x, bank, alphas, 64)
    null = noise_features(net, z0, None, bank, alphas, 64)
    assert not torch.allclose(with_hint.F, null.F, atol=1e-5)
    # an image's own SG residuals, passed as "prototype" conditions, reproduce its hint pass
    down, mid = sg_residual_means(net, z0[:1], x[:1], bank, alphas, 5)
    assert down[0].shape[0] == 8 and mid.shape[0] == 8
    given = noise_features(net, z0[:1], None, bank, alphas, 64, residuals=(down, mid))
    assert torch.allclose(given.F, with_hint.F[:1], atol=1e-5)


def test_bank_rejects_more_samples_than_timesteps():
    with pytest.raises(ValueError, match="n_stages"):
        NoiseBank.create(NoiseConfig(n_stages=10, m_samples=20), 100, (3, 4, 4))
