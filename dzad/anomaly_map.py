"""Anomaly map: feature distance between x0 and x0_hat, two-branch gating, smoothing (eq. 14-15).

Base map (the cosine term of eq. 14/15): sum over backbone levels of ``1 - w * cos(Phi(x0),
Phi(x0_hat))`` upsampled to the image size (sigma_n of the paper = bilinear upsampling). The gate
``w`` is what the two branches change (docs/method.md §9):

- images detected normal (eq. 14): a scalar ``w_pn >= 1`` pulls the map toward zero (each level's
  term is clamped at 0);
- images detected anomalous (eq. 15): ``w_pa(p) = clamp(exp(-max(err(p) - ref(p), 0) / s), floor,
  1)`` in (0, 1], where ``err`` is the image's spatial noise error, ``ref`` that of the most similar
  SOURCE normal image (nearest by key) and ``s`` the spread (std) of the reference bank's errors, so
  the map rises where the error exceeds what a normal image shows. A difference, not a ratio: the
  error maps are standardised per stage (``dzad.detection.weighted_map``) and may be negative.

``cfg.gating``: ``spatial`` (default), ``scalar`` (the anomalous gate is one number per image, from
the mean errors), ``transductive`` (reference taken from the images of the same batch that were
detected normal; reported as "batch zero-shot"; no reference in the batch means no gate), ``none``.
For latents without a decoder the same map is computed on latents (one "level": z0 vs z0_hat), with
cosine or mean squared distance (``cfg.latent_distance``); for L2 the gate divides the distance.
``cfg.base = "noise_excess"`` replaces the distance by the spatial noise error's excess over SOURCE
normals (no reconstruction; :func:`excess_term`), gated the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dzad.config import MapConfig

REFERENCE_SIZE = 256  # sigma and pool_k are specified at 256 px (docs/method.md §9-§10)


def scaled(value: float, size: int) -> float:
    """A length given at 256 px (sigma, pool_k) scaled to an image side of ``size`` px."""
    return value * size / REFERENCE_SIZE


def _weight(pixel_weight: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | float:
    """Gate ``None`` | ``(B,)`` | ``(B, 1, H, W)`` as a factor broadcastable to ``(B, 1, H, W)``."""
    if pixel_weight is None:
        return 1.0
    return pixel_weight.view(-1, 1, 1, 1) if pixel_weight.ndim == 1 else pixel_weight.to(like)


def upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of ``(B, 1, h, w)`` to ``(B, 1, *size)`` (sigma_n of eq. 14/15)."""
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)


def base_map(
    f_x: Sequence[torch.Tensor],
    f_xhat: Sequence[torch.Tensor],
    size: tuple[int, int],
    pixel_weight: torch.Tensor | None = None,
    distance: str = "cosine",
) -> torch.Tensor:
    """``(B, 1, H, W)`` map from per-level features ``(B, C_l, h_l, w_l)`` of x0 and x0_hat.

    cosine: ``sum_l clamp(1 - w * up(cos_l), min=0)`` (eq. 14/15); l2: ``sum_l up(d_l) / w`` with
    ``d_l`` the channel-mean squared difference. ``pixel_weight`` is the gate ``w``.
    """
    if len(f_x) != len(f_xhat) or not f_x:
        raise ValueError("base_map needs the same non-zero number of levels for x0 and x0_hat")
    total = None
    for a, b in zip(f_x, f_xhat, strict=True):
        if distance == "cosine":
            sim = F.cosine_similarity(a, b, dim=1, eps=1e-8).unsqueeze(1)  # (B, 1, h_l, w_l)
        elif distance == "l2":
            sim = (a - b).pow(2).mean(1, keepdim=True)
        else:
            raise ValueError(f"unknown distance {distance!r}")
        sim = upsample(sim, size)
        w = _weight(pixel_weight, sim)
        term = (1 - w * sim).clamp_min(0) if distance == "cosine" else sim / w
        total = term if total is None else total + term
    return total


def excess_term(
    excess: torch.Tensor, size: tuple[int, int], pixel_weight: torch.Tensor
) -> torch.Tensor:
    """``(B, 1, H, W)`` map of the noise-excess base (``cfg.base``): ``up(excess) / w``.

    ``excess`` ``(B, h, w)`` from :func:`dzad.detection.excess_map`, ``pixel_weight`` the gate
    ``w`` ``(B, 1, H, W)``: as for the L2 distance the gate divides, so an image detected normal
    is scaled down by ``w_pn`` (eq. 14) and positions whose error exceeds the nearest SOURCE
    normal's are raised by ``1 / w_pa`` (eq. 15).
    """
    up = upsample(excess.unsqueeze(1), size)
    return up / _weight(pixel_weight, up)


def nearest_reference(
    keys: torch.Tensor, bank_keys: torch.Tensor, bank_maps: torch.Tensor
) -> torch.Tensor:
    """Error map ``(B, h, w)`` of the bank image nearest (Euclidean) to each key ``(B, N)``.

    ``bank_keys`` ``(K, N)``, ``bank_maps`` ``(K, h, w)``: SOURCE normals (or, transductive, the
    batch's detected normals).
    """
    idx = torch.cdist(keys.float(), bank_keys.to(keys).float()).argmin(dim=1)
    return bank_maps.to(keys.device)[idx]


def anomalous_gate(
    err: torch.Tensor,
    ref: torch.Tensor,
    size: tuple[int, int],
    floor: float,
    spatial: bool,
    spread: float,
) -> torch.Tensor:
    """Eq. 15's ``w_pa``: ``(B, 1, H, W)`` in ``[floor, 1]`` from error maps ``(B, h, w)``.

    ``exp(-max(err - ref, 0) / spread)``: 1 where the image's error is at most the reference's,
    falling as it exceeds it; ``spatial=False`` compares the map means (one value per image).
    """
    if spatial:
        excess = upsample((err - ref).clamp_min(0).unsqueeze(1), size)
    else:
        excess = (err.mean(dim=(1, 2)) - ref.mean(dim=(1, 2))).clamp_min(0)
        excess = excess.view(-1, 1, 1, 1).expand(-1, 1, *size)
    return torch.exp(-excess / spread).clamp(floor, 1.0)


def gate_weights(
    decision: torch.Tensor,
    err: torch.Tensor,
    keys: torch.Tensor,
    cfg: MapConfig,
    size: tuple[int, int],
    bank_keys: torch.Tensor | None = None,
    bank_maps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gate ``w`` ``(B, 1, H, W)`` of eq. 14/15 for a batch.

    ``decision`` ``(B,)`` bool (True = detected anomalous), ``err`` ``(B, h, w)`` spatial noise
    error, ``keys`` ``(B, N)`` similarity keys; ``bank_*`` the SOURCE-normal reference bank
    (``calibration.normal_keys`` / ``normal_spatial``; needed by ``spatial`` and ``scalar``). The
    spread ``s`` of eq. 15's gate is the std of the reference maps (1 when they are constant).
    """
    b = decision.shape[0]
    w = torch.ones(b, 1, *size, device=err.device, dtype=err.dtype)
    if cfg.gating == "none":
        return w
    if cfg.w_pn < 1:
        raise ValueError(f"anomaly_map.w_pn must be >= 1, got {cfg.w_pn}")
    w[~decision] = cfg.w_pn  # eq. 14
    anomalous = decision.nonzero().flatten()
    if anomalous.numel() == 0:
        return w
    if cfg.gating == "transductive":
        normal = (~decision).nonzero().flatten()
        if normal.numel() == 0:
            return w  # no detected-normal image in the batch: nothing to compare with
        bank_keys, bank_maps = keys[normal], err[normal]
    elif bank_keys is None or bank_maps is None or bank_keys.numel() == 0:
        raise ValueError(f"gating {cfg.gating!r} needs the SOURCE-normal reference bank")
    ref = nearest_reference(keys[anomalous], bank_keys, bank_maps)
    spread = float(bank_maps.float().std(unbiased=False)) if bank_maps.numel() > 1 else 0.0
    w[anomalous] = anomalous_gate(
        err[anomalous], ref, size, cfg.w_pa_floor, cfg.gating != "scalar", spread or 1.0
    )  # eq. 15
    return w


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian ``(2r+1,)`` truncated at 4 sigma (as scipy.ndimage)."""
    radius = max(1, int(4 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def smooth(m: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(B, 1, H, W)`` (replicate borders); sigma in pixels.

    Not ``torchvision``'s ``gaussian_blur``: it pads by reflection, which changes every map near the
    border and so every published number; replicate borders are what the results were made with.
    """
    if sigma <= 0:
        return m
    k = gaussian_kernel(sigma).to(m)
    r = k.numel() // 2
    out = F.conv2d(F.pad(m, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
