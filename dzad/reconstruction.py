"""DDIM reconstruction x0_hat with the SG network conditioned on x0 at every step (method.md §8).

z0 is noised to the first timestep of a DDIM grid over [0, t_start] (``t_start`` itself for the
"trailing" spacing) and denoised with deterministic DDIM (eta 0 by default), no guidance. The grid
is the one ``diffusers.DDIMScheduler.set_timesteps`` builds for a schedule of ``t_start + 1``
steps; the update is DDIM eq. 12 on the training schedule's alpha-bar, written out here because
the x0-prediction is clamped to the SOURCE latent range (per channel) before the next step, which
keeps the sampler bounded even when the network is poor (diffusers clamps to a scalar range only).

Noise is drawn per image from a seed derived from ``cfg.seed`` and the image's content, so batch
size and image order never change a reconstruction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler

from dzad.config import ReconstructionConfig

ClampRange = tuple[float | torch.Tensor, float | torch.Tensor]


def ddim_timesteps(cfg: ReconstructionConfig) -> torch.Tensor:
    """The descending DDIM grid ``(steps,)`` long over ``[0, cfg.t_start]``.

    "trailing" starts exactly at ``t_start`` (999, 899, ..., 99 by default); "leading" is DiAD's /
    LDM's grid (901, 801, ..., 1: ``steps_offset`` 1).
    """
    if not 1 <= cfg.steps <= cfg.t_start + 1:
        raise ValueError(f"reconstruction.steps must be in [1, t_start + 1], got {cfg.steps}")
    grid = DDIMScheduler(
        num_train_timesteps=cfg.t_start + 1,
        timestep_spacing=cfg.spacing,
        steps_offset=1 if cfg.spacing == "leading" else 0,
    )
    grid.set_timesteps(cfg.steps)
    return grid.timesteps.long()


def image_seeds(images: torch.Tensor, base_seed: int) -> list[int]:
    """One 63-bit seed per image ``(B, 3, H, W)`` from ``base_seed`` and its 8-bit quantised pixels.

    Quantising first makes the seed immune to float noise from resizing on another device.
    """
    quantised = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    seeds = []
    for img in quantised:
        digest = hashlib.sha256(np.ascontiguousarray(img).tobytes())
        digest.update(str(base_seed).encode())
        seeds.append(int.from_bytes(digest.digest()[:8], "little") >> 1)
    return seeds


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(len(seeds), *shape)`` standard normal noise, each row from its own CPU generator."""
    rows = [
        torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(s)))
        for s in seeds
    ]
    return torch.stack(rows).to(device)


def _as_channel(v: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A bound as a tensor broadcastable to ``like`` ``(B, C, h, w)``: scalar or ``(C,)``."""
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return t.view(1, -1, 1, 1) if t.ndim == 1 else t


def ddim_step(
    z_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prev: torch.Tensor,
    clamp_range: ClampRange | None = None,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update (Song et al. eq. 12) on ``(B, C, h, w)``; returns ``(z_prev, x0_pred)``.

    With ``clamp_range`` the x0-prediction is clamped and epsilon re-derived from the clamped x0
    (as Glide / diffusers' ``use_clipped_model_output``), so ``z_prev`` stays consistent with it.
    """
    x0 = (z_t - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    if clamp_range is not None:
        lo, hi = (_as_channel(v, x0) for v in clamp_range)
        x0 = torch.maximum(torch.minimum(x0, hi), lo)
        eps = (z_t - alpha_t.sqrt() * x0) / (1 - alpha_t).sqrt()
    std = torch.zeros_like(alpha_t)
    if eta > 0:
        # sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
        std = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()
    z_prev = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp_min(0).sqrt() * eps
    if eta > 0 and noise is not None:
        z_prev = z_prev + std * noise
    return z_prev, x0


def reconstruct(
    net: torch.nn.Module,
    z0: torch.Tensor,
    hint: torch.Tensor | None,
    cfg: ReconstructionConfig,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    clamp_range: ClampRange | None = None,
    *,
    alphas_cumprod: torch.Tensor,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """x0_hat latent ``(B, C, h, w)`` from z0 ``(B, C, h, w)``; decode it once, outside.

    ``net.predict_noise(z_t, t, hint)`` is the SG-conditioned denoiser (eq. 9), conditioned on the
    same hint (``net.hint(x0, z0)``) at every step: its embedding ``net.embed_hint(hint, z0)`` is
    computed once and passed as ``hint_embedding``. ``alphas_cumprod`` ``(T,)`` is the training
    schedule.
    Noise: per-image ``seeds`` when given (batch-invariant; see :func:`image_seeds`), else drawn
    from ``generator`` for the whole batch. ``clamp_range`` ``(lo, hi)`` (floats or ``(C,)``)
    is used only when ``cfg.clamp`` is true.
    """
    if alphas_cumprod.numel() != num_train_timesteps:
        raise ValueError(
            f"alphas_cumprod has {alphas_cumprod.numel()} entries, expected {num_train_timesteps}"
        )
    if cfg.t_start >= num_train_timesteps:
        raise ValueError(
            f"t_start {cfg.t_start} must be < num_train_timesteps {num_train_timesteps}"
        )
    device = z0.device
    alphas = alphas_cumprod.to(device=device, dtype=z0.dtype)
    grid = ddim_timesteps(cfg).tolist()
    clamp = clamp_range if cfg.clamp else None
    n_draws = 1 + (len(grid) if cfg.eta > 0 else 0)  # start noise, then one per stochastic step
    if seeds is not None:
        if len(seeds) != z0.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {z0.shape[0]}")
        draws = seeded_noise(seeds, (n_draws, *z0.shape[1:]), device).transpose(0, 1)
    else:
        draws = torch.randn((n_draws, *z0.shape), generator=generator).to(device)

    # q(z_t | z0) at the grid's first timestep (eq. 7 with alpha-bar)
    a0 = alphas[grid[0]]
    z = a0.sqrt() * z0 + (1 - a0).sqrt() * draws[0]
    embedded = net.embed_hint(hint, z0)  # x0's SG hint embedding, the same at every step
    for i, t in enumerate(grid):
        t_batch = torch.full((z0.shape[0],), t, dtype=torch.long, device=device)
        # SG conditioned on x0 at every step; no guidance
        eps = net.predict_noise(z, t_batch, None, hint_embedding=embedded)
        alpha_prev = alphas[grid[i + 1]] if i + 1 < len(grid) else torch.ones_like(a0)
        noise = draws[i + 1] if cfg.eta > 0 else None
        z, _ = ddim_step(z, eps, alphas[t], alpha_prev, clamp, cfg.eta, noise=noise)
    return z
