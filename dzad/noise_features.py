"""Multi-timestep noise-feature matrix F (eq. 11-12, docs/method.md §5).

The schedule's T steps are cut into N disjoint buckets ``b_n = [nT/N, (n+1)T/N)`` (n = N-1 the
noisiest), each probed at M bucket-centred timesteps. One seeded noise bank ``eps[n, m]`` is shared
by every image and every hypothesis (common random numbers), so score differences between images
come from the images, not from the draw. All B*N*M evaluations run as a few large batched forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dzad.config import NoiseConfig
from dzad.networks import DZADNetwork


@dataclass
class NoiseBank:
    """``timesteps`` ``(N,M)`` long; ``noise`` ``(N,M,C,h,w)`` float32 (common random numbers)."""

    timesteps: Tensor
    noise: Tensor

    @property
    def n_stages(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def m_samples(self) -> int:
        return int(self.timesteps.shape[1])

    @classmethod
    def create(
        cls, cfg: NoiseConfig, num_train_timesteps: int, latent_shape: tuple[int, int, int]
    ) -> NoiseBank:
        """``t_nm = floor(nT/N + (m + 0.5) T/(NM))``; noise from a generator seeded ``cfg.seed``."""
        n_, m_, t_ = cfg.n_stages, cfg.m_samples, num_train_timesteps
        if not 0 < n_ * m_ <= t_:
            raise ValueError(f"noise: need 0 < n_stages*m_samples <= T={t_}, got {n_}x{m_}")
        n = torch.arange(n_, dtype=torch.float64)[:, None]
        m = torch.arange(m_, dtype=torch.float64)[None, :]
        # integer arithmetic keeps floor() exact: (n*M + m + 0.5) * T / (N*M)
        timesteps = torch.floor((n * m_ + m + 0.5) * t_ / (n_ * m_)).long()
        gen = torch.Generator().manual_seed(cfg.seed)
        noise = torch.randn((n_, m_, *latent_shape), generator=gen)
        return cls(timesteps, noise)

    def to_tensors(self) -> dict[str, Tensor]:
        return {"timesteps": self.timesteps, "noise": self.noise}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> NoiseBank:
        return cls(tensors["timesteps"].long(), tensors["noise"].float())


@dataclass
class NoiseFeatures:
    """``F`` ``(B,N,M)``: eq. 12 entries; ``spatial`` ``(B,N,h,w)``: mean over C and M."""

    F: Tensor
    spatial: Tensor

    @staticmethod
    def cat(parts: list[NoiseFeatures]) -> NoiseFeatures:
        return NoiseFeatures(torch.cat([p.F for p in parts]), torch.cat([p.spatial for p in parts]))


Residuals = tuple[list[Tensor], Tensor]

# test-time views (``noise.views``): the image dimensions each flips; a flip is its own inverse
VIEWS: dict[str, tuple[int, ...]] = {
    "identity": (),
    "hflip": (-1,),
    "vflip": (-2,),
    "hvflip": (-2, -1),
}


def flip_view(x: Tensor, view: str) -> Tensor:
    """``x`` ``(..., H, W)`` (images or error maps) seen in ``view``; twice = the identity."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; noise.views takes {sorted(VIEWS)}")
    return x.flip(VIEWS[view]) if VIEWS[view] else x


def average_views(parts: list[NoiseFeatures], views: Sequence[str]) -> NoiseFeatures:
    """Mean of the features of each view ``(B,N,M)`` / ``(B,N,h,w)``, every spatial error flipped
    back to the image's own positions first (test-time augmentation: more noise draws per stage,
    each seeing the image differently oriented)."""
    if len(parts) != len(views) or not parts:
        raise ValueError("average_views needs one NoiseFeatures per view")
    matrix = torch.stack([p.F for p in parts]).mean(0)
    spatial = torch.stack([flip_view(p.spatial, v) for p, v in zip(parts, views, strict=True)])
    return NoiseFeatures(matrix, spatial.mean(0))


ViewedImages = list[tuple[str, Tensor, Tensor]]  # (view, image (B,3,H,W), its latent (B,C,h,w))


def encode_views(
    encode: Callable[[Tensor], Tensor],
    x0: Tensor,
    views: tuple[str, ...],
    z0: Tensor | None = None,
) -> ViewedImages:
    """Images ``x0`` ``(B,3,H,W)`` in each of ``views``, each encoded once; ``z0 = encode(x0)``,
    when given, serves the identity view. Latents are fp32 whatever autocast block encodes them
    (dzad.precision): the noising of eq. 7 stays exact."""
    out = []
    for v in views:
        x = flip_view(x0, v)
        out.append((v, x, z0 if v == "identity" and z0 is not None else encode(x).float()))
    return out


@dataclass
class NoisedPairs:
    """One chunk of (image, bank entry) pairs: pair ``p`` = ``img * N*M + j``, ``j = n*M + m``.

    ``p``, ``img``, ``j`` ``(P,)`` long; ``t`` ``(P,)`` timesteps; ``eps`` ``(P,C,h,w)`` the bank's
    noise; ``z_t`` ``(P,C,h,w)`` = ``sqrt(ab_t) z0[img] + sqrt(1-ab_t) eps`` (eq. 7 with alpha-bar).
    """

    p: Tensor
    img: Tensor
    j: Tensor
    t: Tensor
    eps: Tensor
    z_t: Tensor


def noised_pairs(
    z0: Tensor, bank: NoiseBank, alphas_cumprod: Tensor, max_batch: int
) -> Iterator[NoisedPairs]:
    """Every (image, bank entry) pair of ``z0`` ``(B,C,h,w)``, noised, in chunks of ``max_batch``
    (``ceil(B*N*M/max_batch)`` chunks): the batching shared by every multi-timestep pass."""
    b_, c_, h_, w_ = z0.shape
    nm = bank.n_stages * bank.m_samples
    device = z0.device
    t_flat = bank.timesteps.reshape(nm).to(device)
    eps_flat = bank.noise.reshape(nm, c_, h_, w_).to(device, z0.dtype)
    ab = alphas_cumprod.to(device, torch.float32)[t_flat].to(z0.dtype)
    for start in range(0, b_ * nm, max_batch):
        p = torch.arange(start, min(start + max_batch, b_ * nm), device=device)
        img, j = p // nm, p % nm
        a = ab[j].view(-1, 1, 1, 1)
        eps = eps_flat[j]
        yield NoisedPairs(p, img, j, t_flat[j], eps, a.sqrt() * z0[img] + (1 - a).sqrt() * eps)


def noise_features(
    net: DZADNetwork,
    z0: Tensor,
    hint: Tensor | None,
    bank: NoiseBank,
    alphas_cumprod: Tensor,
    max_batch: int,
    *,
    residuals: Residuals | None = None,
) -> NoiseFeatures:
    """eq. 11-12 for a batch: ``z0`` ``(B,C,h,w)``, ``hint`` ``(B,3,H,W)`` or None (null hint).

    Pairs of images and bank entries as :func:`noised_pairs`. The SG hint embedding
    ``(B,C_0,H',W')`` is computed once and its row b reused by every pair of image b.
    ``residuals`` (prototype mode): SG residuals per bank entry, each tensor ``(N*M, ...)``, used
    instead of SG(x0).
    """
    b_, _, h_, w_ = z0.shape
    n_, m_ = bank.n_stages, bank.m_samples
    device = z0.device
    err = torch.empty(b_ * n_ * m_, h_, w_, device=device)
    with torch.inference_mode():
        embedded = net.embed_hint(hint, z0) if residuals is None else None
        if residuals is not None:  # on the device once, not once per chunk
            residuals = ([r.to(device) for r in residuals[0]], residuals[1].to(device))
        for c in noised_pairs(z0, bank, alphas_cumprod, max_batch):
            res = None
            if residuals is not None:
                res = ([r[c.j] for r in residuals[0]], residuals[1][c.j])
            emb = None if embedded is None else embedded[c.img]
            pred = net.predict_noise(c.z_t, c.t, None, residuals=res, hint_embedding=emb)
            err[c.p] = (c.eps - pred).float().pow(2).mean(1)  # eq. 12, mean over C
    err = err.view(b_, n_, m_, h_, w_)
    return NoiseFeatures(F=err.mean((3, 4)), spatial=err.mean(2))


def view_features(
    net: DZADNetwork,
    viewed: ViewedImages,
    bank: NoiseBank,
    alphas_cumprod: Tensor,
    max_batch: int,
    *,
    null_hint: bool = False,
    residuals: Residuals | None = None,
) -> NoiseFeatures:
    """:func:`noise_features` of every view of :func:`encode_views` (the hint is that view's
    :meth:`DZADNetwork.hint`, or None when ``null_hint``), averaged by :func:`average_views`."""
    parts = []
    for _, x, z in viewed:
        hint = None if null_hint else net.hint(x, z)
        parts.append(
            noise_features(net, z, hint, bank, alphas_cumprod, max_batch, residuals=residuals)
        )
    return average_views(parts, [v for v, _, _ in viewed])


def sg_residual_means(
    net: DZADNetwork,
    z0: Tensor,
    hint: Tensor,
    bank: NoiseBank,
    alphas_cumprod: Tensor,
    max_batch: int,
) -> Residuals:
    """Sum over the batch of the SG residuals at every bank entry (divide by B for the mean).

    Returns down skips each ``(N*M, C_k, h_k, w_k)`` and middle ``(N*M, C, h', w')``; used to build
    the prototype conditions of docs/method.md §7 (per-timestep mean SG residuals of a class of
    images).
    """
    nm = bank.n_stages * bank.m_samples
    device = z0.device
    down_sum: list[Tensor] | None = None
    mid_sum: Tensor | None = None
    with torch.inference_mode():
        embedded = net.embed_hint(hint, z0)  # (B, C_0, H', W'), reused by every pair of image b
        for c in noised_pairs(z0, bank, alphas_cumprod, max_batch):
            down, mid = net.residuals(c.z_t, c.t, None, hint_embedding=embedded[c.img])
            if down_sum is None or mid_sum is None:
                down_sum = [torch.zeros(nm, *r.shape[1:], device=device) for r in down]
                mid_sum = torch.zeros(nm, *mid.shape[1:], device=device)
            for acc, r in zip(down_sum, down, strict=True):
                acc.index_add_(0, c.j, r.float())
            mid_sum.index_add_(0, c.j, mid.float())
    assert down_sum is not None and mid_sum is not None
    return [d.clone() for d in down_sum], mid_sum.clone()  # normal tensors, outside inference mode
