"""Encoders E (docs/method.md §2): images ``(B,3,H,W)`` in [0,1] -> latents ``z0`` ``(B,C,h,w)``.

``pixel`` and ``pixel_unshuffle`` are the small-scale latents, ``vae`` is SD's AutoencoderKL
(posterior mean x scaling factor, paper scale) and ``backbone_features`` (method.md §2) is a frozen
ImageNet backbone's multi-scale features on one grid, standardised and PCA-reduced with statistics
fitted on SOURCE normals only. Every encoder is frozen: only the denoiser, the SG network and SFF
are trained (eq. 8).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dzad.config import ModelConfig
from dzad.errors import DZADInputError
from dzad.local_models import load_local


class Encoder(nn.Module):
    """Common interface; subclasses set ``latent_channels``, ``downsample`` and ``can_decode``."""

    latent_channels: int
    downsample: int
    can_decode: bool = True

    def encode(self, x: Tensor) -> Tensor:
        """``(B,3,H,W)`` in [0,1] -> ``(B,C,H/downsample,W/downsample)``."""
        raise NotImplementedError

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """``(C,h,w)`` of the latent of a square ``image_size`` image: the shape :meth:`encode`
        gives each image, the network's input and the noise bank's entries."""
        side = image_size // self.downsample
        return (self.latent_channels, side, side)

    def decode(self, z: Tensor) -> Tensor:
        """``(B,C,h,w)`` -> ``(B,3,h*downsample,w*downsample)`` in [0,1]."""
        raise NotImplementedError(f"the {type(self).__name__} latent cannot be decoded to pixels")

    def fit(self, images: Iterable[Tensor]) -> None:
        """Fit statistics on SOURCE-normal batches ``(B,3,H,W)`` (no-op when there are none)."""
        return None

    def extra_state(self) -> dict[str, Tensor]:
        """Fitted statistics saved in the checkpoint's ``extra.safetensors`` (weights excluded)."""
        return {}

    def load_extra_state(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`extra_state`."""
        return None

    def latent_range(self) -> tuple[float, float] | None:
        """(min, max) of SOURCE-normal latents, for clamping x0-predictions; None before fit."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x)


class _FittedRange(Encoder):
    """An encoder whose latent range is measured on the SOURCE normals by :meth:`fit`."""

    def _init_range(self) -> None:
        self.register_buffer("range", torch.tensor([math.inf, -math.inf]))

    @torch.no_grad()
    def _update_range(self, z: Tensor) -> None:
        self.range[0] = torch.minimum(self.range[0], z.min())
        self.range[1] = torch.maximum(self.range[1], z.max())

    def latent_range(self) -> tuple[float, float] | None:
        low, high = self.range.tolist()
        return (low, high) if low <= high else None


class PixelEncoder(Encoder):
    """Identity latent, rescaled to [-1, 1] like the diffusion prior expects."""

    def __init__(self) -> None:
        super().__init__()
        self.latent_channels, self.downsample = 3, 1

    def encode(self, x: Tensor) -> Tensor:
        return x * 2 - 1

    def decode(self, z: Tensor) -> Tensor:
        return ((z + 1) / 2).clamp(0, 1)

    def latent_range(self) -> tuple[float, float]:
        return (-1.0, 1.0)


class PixelUnshuffleEncoder(Encoder):
    """Space-to-depth by ``factor``: ``(B,3,H,W)`` -> ``(B,3f^2,H/f,W/f)`` in [-1, 1]; lossless."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"model.unshuffle_factor must be >= 1, got {factor}")
        self.latent_channels, self.downsample = 3 * factor * factor, factor

    def encode(self, x: Tensor) -> Tensor:
        return F.pixel_unshuffle(x * 2 - 1, self.downsample)

    def decode(self, z: Tensor) -> Tensor:
        return ((F.pixel_shuffle(z, self.downsample) + 1) / 2).clamp(0, 1)

    def latent_range(self) -> tuple[float, float]:
        return (-1.0, 1.0)


class VAEEncoder(_FittedRange):
    """SD's AutoencoderKL: ``z0 = mean of q(z|x) * scaling_factor`` (deterministic, no sampling).

    ``fit`` only measures the SOURCE latent range (the VAE itself stays frozen).
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling = float(vae.config.scaling_factor)
        self._init_range()

    def fit(self, images: Iterable[Tensor]) -> None:
        for x in images:
            self._update_range(self.encode(x.to(self.range.device)))

    def extra_state(self) -> dict[str, Tensor]:
        return {"range": self.range.detach().cpu()}

    def load_extra_state(self, tensors: dict[str, Tensor]) -> None:
        self.range.copy_(tensors["range"])

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self.vae.encode(x * 2 - 1).latent_dist.mean * self.scaling

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return ((self.vae.decode(z / self.scaling).sample + 1) / 2).clamp(0, 1)


class BackboneFeatureEncoder(_FittedRange):
    """Frozen ImageNet backbone -> one ``image_size/feature_stride`` grid -> standardise -> PCA.

    Every level of the backbone's pyramid goes onto the grid (``dzad.backbones.feature_grid``:
    optional local averaging, then average pooling or bilinear upsampling; ``C_in`` channels).
    ``fit`` estimates the per-channel mean/std and the top ``latent_channels`` principal axes of the
    standardised features over every grid position of the SOURCE normals (method.md §11: not target
    data); they are buffers, so they travel in the checkpoint. The latent is divided by one global
    scale (the root mean of the kept eigenvalues) so its variance is ~1 like the diffusion prior
    assumes, or whitened per axis when ``pca_whiten``. Not decodable.
    """

    can_decode = False

    def __init__(self, cfg: ModelConfig, image_size: int) -> None:
        super().__init__()
        from dzad.backbones import build_backbone

        with torch.random.fork_rng(devices=[]):  # random (test) weights: the same at every load
            torch.manual_seed(0)
            self.backbone = build_backbone(cfg.feature_backbone, cfg.random_backbone)
        self.backbone.eval().requires_grad_(False)
        c_in = int(sum(self.backbone.channels))
        if not 0 < cfg.latent_channels <= c_in:
            raise ValueError(
                f"model.latent_channels must be in 1..{c_in} for {cfg.feature_backbone}, "
                f"got {cfg.latent_channels}"
            )
        self.latent_channels, self.downsample = cfg.latent_channels, cfg.feature_stride
        self.grid = image_size // cfg.feature_stride
        self.whiten = cfg.pca_whiten
        self.local_pool = cfg.feature_local_pool
        self.register_buffer("mean", torch.zeros(c_in))
        self.register_buffer("std", torch.ones(c_in))
        self.register_buffer("components", torch.zeros(cfg.latent_channels, c_in))
        self.register_buffer("scale", torch.ones(cfg.latent_channels))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._init_range()

    @torch.no_grad()
    def pooled_features(self, x: Tensor) -> Tensor:
        """``(B,3,H,W)`` -> ``(B,C_in,g,g)``: every backbone level resampled onto the grid."""
        from dzad.backbones import feature_grid

        return feature_grid(self.backbone(x), (self.grid, self.grid), self.local_pool)

    @torch.no_grad()
    def fit(self, images: Iterable[Tensor]) -> None:
        n, total, outer, kept = 0, None, None, []
        for batch in images:
            f = self.pooled_features(batch.to(self.mean.device))
            kept.append(f)  # second pass below: the latent range after projection
            f = f.double()
            flat = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (B*g*g, C_in)
            n += flat.shape[0]
            total = flat.sum(0) if total is None else total + flat.sum(0)
            outer = flat.T @ flat if outer is None else outer + flat.T @ flat
        if n < 2 or total is None or outer is None:
            raise ValueError("backbone_features: fit() needs at least one SOURCE-normal image")
        mean = total / n
        cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
        std = cov.diagonal().clamp_min(1e-12).sqrt()
        corr = cov / torch.outer(std, std)
        evals, evecs = torch.linalg.eigh(corr)  # ascending
        order = torch.argsort(evals, descending=True)[: self.latent_channels]
        evals, axes = evals[order].clamp_min(1e-12), evecs[:, order].T  # (C, C_in)
        # eigenvectors have no sign: fix it (largest |entry| positive) so fits are reproducible
        signs = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
        axes = axes * signs
        scale = evals.sqrt() if self.whiten else evals.mean().sqrt().expand_as(evals)
        self.mean.copy_(mean.float())
        self.std.copy_(std.float())
        self.components.copy_(axes.float())
        self.scale.copy_(scale.float())
        self.fitted.fill_(True)
        for f in kept:
            self._update_range(self._project(f))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        if not bool(self.fitted):
            raise RuntimeError("backbone_features latent: call fit() on SOURCE normals first")
        return self._project(self.pooled_features(x))

    def _project(self, f: Tensor) -> Tensor:
        """Grid features ``(B,C_in,g,g)`` -> standardised, PCA-reduced ``(B,C,g,g)``."""
        f = (f - self.mean[:, None, None]) / self.std[:, None, None]
        z = torch.einsum("kc,bchw->bkhw", self.components, f)
        return z / self.scale[:, None, None]

    def extra_state(self) -> dict[str, Tensor]:
        names = ("mean", "std", "components", "scale", "fitted", "range")
        return {k: getattr(self, k).detach().cpu() for k in names}

    def load_extra_state(self, tensors: dict[str, Tensor]) -> None:
        for key, value in tensors.items():
            getattr(self, key).copy_(value)


def random_vae(profile: str) -> nn.Module:
    """A randomly initialised AutoencoderKL (tests only); 4 levels: downsamples by 8 like SD's."""
    from diffusers import AutoencoderKL

    widths = (8, 8, 16, 16) if profile == "tiny" else (128, 256, 512, 512)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=widths,
        layers_per_block=1 if profile == "tiny" else 2,
        norm_num_groups=4 if profile == "tiny" else 32,
        latent_channels=4,
        scaling_factor=0.18215,
    )


def load_vae(source: str, subfolder: str | None = None) -> nn.Module:
    """An AutoencoderKL from a local diffusers folder (local files only, :mod:`dzad.local_models`)
    or, when no such folder exists, a hub id (``from_pretrained``, safetensors; training only: a
    checkpoint's own ``vae/`` is always local)."""
    from diffusers import AutoencoderKL

    local = Path(source) / subfolder if subfolder else Path(source)
    if local.is_dir():
        return load_local(AutoencoderKL, local)
    try:
        return AutoencoderKL.from_pretrained(source, subfolder=subfolder, use_safetensors=True)
    except (OSError, ValueError) as exc:
        where = Path(source) / subfolder if subfolder else Path(source)
        raise DZADInputError(where, f"cannot load an AutoencoderKL: {exc}") from exc


def _vae_from_config(cfg: ModelConfig) -> nn.Module:
    if cfg.vae is not None:
        return load_vae(cfg.vae)
    if cfg.pretrained is not None:
        return load_vae(cfg.pretrained, subfolder="vae")
    if cfg.random_vae:
        return random_vae(cfg.profile)
    raise ValueError(
        "model.latent 'vae' needs model.vae or model.pretrained (a diffusers folder or hub id); "
        "model.random_vae is for tests only"
    )


def latent_downsample(cfg: ModelConfig) -> int:
    """Image size / latent size of ``cfg.latent`` (the ``vae`` latent is SD-shaped: 8)."""
    return {
        "pixel": 1,
        "pixel_unshuffle": cfg.unshuffle_factor,
        "vae": 8,
        "backbone_features": cfg.feature_stride,
    }[cfg.latent]


def build_encoder(cfg: ModelConfig, image_size: int) -> Encoder:
    """The encoder ``cfg.latent`` names, checked against ``image_size`` (square images)."""
    if cfg.latent == "pixel":
        enc: Encoder = PixelEncoder()
    elif cfg.latent == "pixel_unshuffle":
        enc = PixelUnshuffleEncoder(cfg.unshuffle_factor)
    elif cfg.latent == "vae":
        enc = VAEEncoder(_vae_from_config(cfg))
    elif cfg.latent == "backbone_features":
        enc = BackboneFeatureEncoder(cfg, image_size)
    else:
        raise ValueError(f"unknown model.latent {cfg.latent!r}")
    if image_size % enc.downsample:
        raise ValueError(
            f"data.image_size {image_size} is not divisible by the {cfg.latent} latent's "
            f"downsampling factor {enc.downsample}"
        )
    return enc
