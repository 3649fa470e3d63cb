"""A DZAD denoiser adapted to the target (docs/method.md §11.1) and its noise-error map.

Trained on one dataset, the frozen denoiser knows that dataset's normals, not the target's, so
its noise error on an unseen product mostly measures "unlike the SOURCE". Both scoring regimes
can show it the target instead, starting from the SOURCE weights so it takes seconds:

- batch zero-shot: :func:`adapt_network` self-trains a copy on the unlabelled batch (eq. 8). Most
  images are normal; to stay robust to the anomalous minority, training runs in ``rounds`` and
  after each round but the last the ``drop`` fraction of images with the highest noise error is
  left out of the rest of the training;
- few-shot: the same on the k references, without dropping (they are known good).

:func:`noise_error` gives the spatial noise error per stage ``(B, N, h, w)`` of any denoiser with
the model's noise bank; :func:`excess_grid` standardises it against a reference set (the batch
itself, or the references) per stage and position, as the zero-shot noise-excess map does
against SOURCE normals (:func:`dzad.detection.excess_map`). :func:`to_tiles` / :func:`stitch` let
the copy score an image as tiles at its own size and put their maps back together
(``regime.dzad_tiles``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dzad.config import RegimeConfig
from dzad.model import DZAD
from dzad.networks import DZADNetwork
from dzad.noise_features import noise_features


def to_model_size(images: Tensor, size: int) -> Tensor:
    """``(B,3,H,W)`` -> ``(B,3,size,size)`` (antialiased when shrinking), the model's input."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)


def tile_layout(size: int, model_size: int, tiles: int) -> tuple[int, list[int]]:
    """Side (px) and per-axis offsets of ``tiles`` x ``tiles`` square tiles of a ``size`` image.

    One tile: the whole image (resized to the model's size, as without tiling). More: tiles of
    the model's own size (native resolution, no resizing), or larger where ``tiles`` of it
    would not cover the image, evenly spaced from edge to edge (overlapping when
    ``tiles * side > size``, e.g. 3 tiles of 128 px on 256 px: offsets 0, 64, 128).
    """
    if tiles <= 1:
        return size, [0]
    side = min(size, max(model_size, math.ceil(size / tiles)))
    return side, [round(i * (size - side) / (tiles - 1)) for i in range(tiles)]


def to_tiles(images: Tensor, model_size: int, tiles: int) -> Tensor:
    """``(B,3,S,S)`` -> ``(B*tiles^2,3,m,m)`` tiles at the model's size ``m``; order: image,
    then tile row, then tile column (:func:`tile_layout`; one tile = :func:`to_model_size`)."""
    side, offsets = tile_layout(images.shape[-1], model_size, tiles)
    crops = [
        images[:, :, y : y + side, x : x + side][:, None] for y in offsets for x in offsets
    ]  # each (B,1,3,side,side)
    return to_model_size(torch.cat(crops, 1).flatten(0, 1), model_size)


def stitch(maps: Tensor, size: int, tiles: int, model_size: int) -> Tensor:
    """Per-tile maps ``(B*tiles^2,C,h,w)`` of :func:`to_tiles` -> ``(B,C,H,W)`` over the image.

    A tile's cell covers ``side / h`` image pixels, so the image grid is ``H = size * h / side``
    cells (2 tiles of 128 px on 256 px with an 8x8 latent: 16x16); each tile is placed at its
    offset (rounded to whole cells) and overlapping cells are averaged.
    """
    if tiles <= 1:
        return maps
    side, offsets = tile_layout(size, model_size, tiles)
    h, w = maps.shape[-2:]
    grid = round(size * h / side)  # square tiles and latents: h == w
    cells = [min(round(o * h / side), grid - h) for o in offsets]
    per_image = maps.reshape(-1, tiles * tiles, *maps.shape[1:])
    total = maps.new_zeros(per_image.shape[0], maps.shape[1], grid, grid)
    count = maps.new_zeros(1, 1, grid, grid)
    places = [(r, c) for r in cells for c in cells]  # the order of to_tiles
    for t, (r, c) in enumerate(places):
        total[:, :, r : r + h, c : c + w] += per_image[:, t]
        count[:, :, r : r + h, c : c + w] += 1
    return total / count


@torch.no_grad()
def encode(model: DZAD, images: Tensor, batch_size: int = 32) -> tuple[Tensor, Tensor]:
    """``images`` ``(B,3,S,S)`` at the model's size -> (x0, z0 ``(B,C,h,w)``) on its device."""
    x0 = images.to(model.device, torch.float32)
    z0 = torch.cat([model.encoder.encode(x) for x in x0.split(batch_size)])
    return x0, z0


@torch.no_grad()
def noise_error(model: DZAD, net: DZADNetwork, x0: Tensor, z0: Tensor) -> Tensor:
    """Spatial noise error ``(B, N, h, w)`` of ``net`` at the model's bank entries (eq. 11-12)."""
    parts = []
    for x, z in zip(x0.split(32), z0.split(32), strict=True):
        feats = noise_features(
            net, z, net.hint(x, z), model.bank, model.alphas_cumprod, model.cfg.noise.max_batch
        )
        parts.append(feats.spatial.float())
    return torch.cat(parts)


def adapt_network(
    model: DZAD, x0: Tensor, z0: Tensor, cfg: RegimeConfig, robust: bool
) -> tuple[DZADNetwork, list[int]]:
    """A copy of ``model.net`` trained ``cfg.adapt_steps`` steps (eq. 8) on ``z0`` ``(B,C,h,w)``.

    ``robust``: after each of ``cfg.adapt_rounds`` rounds but the last, drop the
    ``cfg.adapt_drop`` fraction of the kept images with the highest mean noise error. Returns the
    network (eval mode) and the indices of the images the last round trained on.
    """
    net = copy.deepcopy(model.net).train().requires_grad_(True)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.adapt_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    t_max = model.cfg.model.num_train_timesteps
    keep = torch.arange(z0.shape[0])
    rounds = max(1, cfg.adapt_rounds if robust else 1)
    per_round = math.ceil(cfg.adapt_steps / rounds)
    for r in range(rounds):
        for _ in range(per_round):
            idx = keep[
                torch.randint(len(keep), (min(cfg.adapt_batch_size, len(keep)),), generator=gen)
            ]
            z, x = z0[idx], x0[idx]
            t = torch.randint(0, t_max, (len(idx),), generator=gen).to(z.device)
            eps = torch.randn(z.shape, generator=gen).to(z)
            ab = model.alphas_cumprod[t].view(-1, 1, 1, 1)
            pred = net(ab.sqrt() * z + (1 - ab).sqrt() * eps, t, net.hint(x, z))
            loss = F.mse_loss(pred.float(), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        if robust and r < rounds - 1:
            net.eval()
            err = noise_error(model, net, x0[keep], z0[keep]).mean((1, 2, 3))  # (K,)
            n_keep = max(2, len(keep) - int(cfg.adapt_drop * len(keep)))
            keep = keep[err.argsort()[:n_keep]]
            net.train()
    return net.eval().requires_grad_(False), keep.tolist()


def _deviation(spatial: Tensor, reference: Tensor) -> Tensor:
    """``spatial`` ``(B,N,h,w)`` minus the references' ``(R,N,h,w)`` median per stage, position."""
    return spatial.float() - reference.float().median(0).values


def _mad_scale(dev: Tensor) -> Tensor:
    """Per-stage scale ``(N,)``: the scaled median absolute deviation of ``dev`` ``(B,N,h,w)``,
    pooled over images and positions."""
    return 1.4826 * dev.abs().transpose(0, 1).flatten(1).median(1).values


def excess_scale(spatial: Tensor, reference: Tensor) -> Tensor:
    """Per-stage scale ``(N,)`` of :func:`excess_grid`: the scaled median absolute deviation of
    ``spatial`` ``(B,N,h,w)`` from the references' ``(R,N,h,w)`` median, pooled over positions."""
    return _mad_scale(_deviation(spatial, reference))


def excess_grid(
    spatial: Tensor, reference: Tensor, weights: Tensor, scale: Tensor | None = None
) -> Tensor:
    """``spatial`` ``(B,N,h,w)`` scored against ``reference`` ``(R,N,h,w)`` -> ``(B,h,w)``.

    Location: the references' median per stage and position; scale (:func:`excess_scale`): the
    median absolute deviation of the scored images from it per stage (pooled over positions, so
    one or two references suffice), or ``scale`` ``(N,)`` when given (another batch's, to put
    these images on its scale). ``sum_n w_n max(z_n(p), 0)^2`` as the zero-shot noise-excess map.
    """
    dev = _deviation(spatial, reference)
    scale = _mad_scale(dev) if scale is None else scale
    z = dev / scale.clamp_min(1e-8).view(1, -1, 1, 1)
    return torch.einsum("bnhw,n->bhw", z.clamp_min(0).pow(2), weights.to(z))
