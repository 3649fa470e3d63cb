"""DDIM reconstruction: grid, update rule, boundedness, per-image seeding."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from dzad.config import ReconstructionConfig
from dzad.reconstruction import ddim_step, ddim_timesteps, image_seeds, reconstruct

T = 1000


def _alphas() -> torch.Tensor:
    return DDIMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear").alphas_cumprod


class OracleNet(torch.nn.Module):
    """Predicts exactly the noise that separates z_t from a known z0 (a perfect denoiser)."""

    def __init__(self, z0: torch.Tensor, alphas: torch.Tensor) -> None:
        super().__init__()
        self.z0, self.alphas = z0, alphas

    def embed_hint(self, hint, z):
        return None  # it needs no hint

    def predict_noise(self, z_t, t, hint, *, hint_embedding=None):
        a = self.alphas[t].view(-1, 1, 1, 1)
        return (z_t - a.sqrt() * self.z0) / (1 - a).sqrt()


class WildNet(torch.nn.Module):
    """An untrained random conv net with a large gain: its predictions push x0 far out of range."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels + 3, channels, 3, padding=1)
        self.calls: list[torch.Tensor] = []

    def embed_hint(self, hint, z):
        return torch.nn.functional.interpolate(hint, size=z.shape[-2:])

    def predict_noise(self, z_t, t, hint, *, hint_embedding):
        self.calls.append(t.clone())
        return 25.0 * self.conv(torch.cat([z_t, hint_embedding], 1))


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_grid_matches_diffusers_for_full_schedule(spacing):
    ref = DDIMScheduler(
        num_train_timesteps=T, timestep_spacing=spacing, steps_offset=int(spacing == "leading")
    )
    ref.set_timesteps(10)
    got = ddim_timesteps(ReconstructionConfig(steps=10, t_start=T - 1, spacing=spacing))
    assert got.tolist() == ref.timesteps.tolist()
    assert ddim_timesteps(ReconstructionConfig(t_start=499)).tolist()[0] == 499


def test_ddim_step_equals_diffusers_step_without_clamp():
    sched = DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule="scaled_linear",
        clip_sample=False,
        timestep_spacing="trailing",
    )
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a = sched.alphas_cumprod
    want = sched.step(eps, 999, z).prev_sample
    got, _ = ddim_step(z, eps, a[999], a[899])
    torch.testing.assert_close(got, want)


def test_perfect_denoiser_reconstructs_z0_exactly():
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    alphas = _alphas()
    hint = torch.rand(2, 3, 16, 16)
    cfg = ReconstructionConfig(clamp=False)
    out = reconstruct(OracleNet(z0, alphas), z0, hint, cfg, T, alphas_cumprod=alphas, seeds=[1, 2])
    torch.testing.assert_close(out, z0, atol=1e-4, rtol=1e-4)


def test_sampler_stays_in_source_range_with_random_network():
    z0 = torch.rand(2, 4, 8, 8) * 2 - 1
    hint = torch.rand(2, 3, 16, 16)
    alphas = _alphas()
    lo, hi = torch.full((4,), -1.0), torch.tensor([1.0, 0.5, 1.0, 2.0])  # per-channel range
    net = WildNet(4)

    def run(clamp: bool) -> torch.Tensor:
        cfg = ReconstructionConfig(clamp=clamp)
        return reconstruct(
            net, z0, hint, cfg, T, clamp_range=(lo, hi), alphas_cumprod=alphas, seeds=[0, 1]
        )

    clamped = run(clamp=True)
    assert torch.isfinite(clamped).all()
    assert (clamped >= lo.view(1, -1, 1, 1) - 1e-5).all()
    assert (clamped <= hi.view(1, -1, 1, 1) + 1e-5).all()
    # the hint embedding is passed at every one of the 10 steps, on the trailing grid from t_start
    assert [int(t[0]) for t in net.calls] == list(range(999, 0, -100))
    free = run(clamp=False)
    assert free.abs().max() > 10  # without the clamp this network does diverge


def test_per_image_seeds_make_results_batch_invariant():
    alphas = _alphas()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    z0 = images[:, :, ::2, ::2] * 2 - 1
    net = WildNet(3)
    cfg = ReconstructionConfig(steps=4, eta=0.5)  # stochastic steps draw per-image noise too
    seeds = image_seeds(images, cfg.seed)
    assert len(set(seeds)) == 3
    batch = reconstruct(
        net, z0, images, cfg, T, clamp_range=(-1.0, 1.0), alphas_cumprod=alphas, seeds=seeds
    )
    for i in (2, 0):
        one = reconstruct(
            net,
            z0[i : i + 1],
            images[i : i + 1],
            cfg,
            T,
            clamp_range=(-1.0, 1.0),
            alphas_cumprod=alphas,
            seeds=image_seeds(images[i : i + 1], cfg.seed),
        )
        torch.testing.assert_close(one[0], batch[i], atol=1e-5, rtol=1e-5)
    assert image_seeds(images, cfg.seed + 1) != seeds


def test_rejects_inconsistent_schedule():
    z0 = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="t_start"):
        reconstruct(
            WildNet(4), z0, None, ReconstructionConfig(t_start=1000), T, alphas_cumprod=_alphas()
        )


def test_untrained_dzad_network_reconstruction_stays_in_pixel_range():
    from dzad.config import ModelConfig
    from dzad.networks import build_network, make_scheduler

    cfg = ModelConfig(profile="tiny", latent="pixel_unshuffle")
    torch.manual_seed(0)
    net = build_network(cfg, 12, 16, image_size=32).eval()
    alphas = make_scheduler(cfg).alphas_cumprod
    images = torch.rand(2, 3, 32, 32)
    z0 = torch.nn.functional.pixel_unshuffle(images * 2 - 1, 2)
    with torch.no_grad():
        out = reconstruct(
            net,
            z0,
            images,
            ReconstructionConfig(steps=4),
            T,
            clamp_range=(-1.0, 1.0),
            alphas_cumprod=alphas,
            seeds=image_seeds(images, 0),
        )
    assert out.shape == z0.shape and torch.isfinite(out).all()
    assert out.abs().max() <= 1.0 + 1e-5
