"""Backbone patch scores without SOURCE statistics (method.md §11.1): mutual (batch) and reference.

MuSc's recipe (Li et al., ICLR 2024), on the library's frozen backbone:

- :func:`patch_features`: backbone levels pooled onto one grid at several local-aggregation
  *degrees* (``r x r`` neighbourhoods, MuSc's multi-degree aggregation; PatchCore uses r = 3);
- :func:`mutual_patch_scores`: each patch's distance to its nearest patch in every OTHER image of
  the batch, sorted, and the smallest ``fraction`` of them averaged (MuSc's interval averaging: a
  defect patch is far from all others, a normal one close to most; the few anomalous images do
  not count because only the closest images enter the mean). Chunked, so at most
  ``max_elements`` distances exist at a time whatever the batch size;
- :func:`reference_patch_scores`: distance to the nearest patch of known-good references
  (few-shot PatchCore memory);
- :func:`rescore_images`: MuSc's image-level re-scoring, each image score replaced by the mean of
  the scores of its ``k`` most similar images (itself included) in global-feature space: similar
  images share a score, which damps the noise of a single max.

Scores of all degrees are averaged (each degree's map on the same grid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dzad.backbones import Backbone, feature_grid

MAX_ELEMENTS = 1 << 24  # ~64 MB of float32 distances per chunk


@torch.inference_mode()
def patch_features(
    backbone: Backbone,
    images: Tensor,
    levels: Sequence[int],
    degrees: Sequence[int],
    batch_size: int = 16,
) -> tuple[list[Tensor], Tensor]:
    """Patches per degree and one global descriptor per image.

    ``images`` ``(B,3,H,W)`` in [0,1] -> (``[(B, h, w, C)]`` one per degree, on the grid of the
    first of ``levels``; global ``(B, C_last)``: the mean of the coarsest chosen level).
    """
    if not levels or max(levels) >= len(backbone.strides):
        raise ValueError(f"levels {tuple(levels)} must index the backbone's {backbone.layer_names}")
    device = backbone.mean.device
    per_degree: list[list[Tensor]] = [[] for _ in degrees]
    glob = []
    for batch in images.split(batch_size):
        feats = backbone(batch.to(device, torch.float32))
        chosen = [feats[i] for i in levels]
        size = tuple(chosen[0].shape[-2:])
        for out, r in zip(per_degree, degrees, strict=True):
            out.append(feature_grid(chosen, size, r).permute(0, 2, 3, 1).cpu())
        glob.append(chosen[-1].mean((2, 3)).float().cpu())
    return [torch.cat(p) for p in per_degree], torch.cat(glob)


def nearest_per_image(queries: Tensor, others: Tensor, max_elements: int = MAX_ELEMENTS) -> Tensor:
    """``(Q, G)``: distance of each query ``(Q, C)`` to its nearest patch in each of ``others``
    ``(G, P, C)``, computed over groups of images so at most ``max_elements`` distances exist."""
    g_, p_, c_ = others.shape
    step = max(1, max_elements // max(1, queries.shape[0] * p_))
    parts = []
    for start in range(0, g_, step):
        chunk = others[start : start + step]
        d = torch.cdist(queries, chunk.reshape(-1, c_))  # (Q, g*P)
        parts.append(d.view(queries.shape[0], chunk.shape[0], p_).amin(2))
    return torch.cat(parts, dim=1)


def interval_count(fraction: float, n_others: int) -> int:
    """How many of the ``n_others`` nearest-image distances are averaged (at least 1)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"mutual fraction must be in (0, 1], got {fraction}")
    return max(1, math.ceil(fraction * n_others))


def mutual_patch_scores(
    patches: Tensor, fraction: float, max_elements: int = MAX_ELEMENTS
) -> Tensor:
    """``patches`` ``(B, h, w, C)`` of one batch -> scores ``(B, h, w)`` (MuSc interval averaging).

    For image i and patch p: the distances from p to its nearest patch in each other image j != i,
    the smallest ``interval_count(fraction, B-1)`` of them averaged.
    """
    b_, h_, w_, c_ = patches.shape
    if b_ < 2:
        raise ValueError("mutual scoring needs at least 2 images scored together")
    flat = patches.reshape(b_, h_ * w_, c_).float()
    k = interval_count(fraction, b_ - 1)
    out = torch.empty(b_, h_ * w_)
    for i in range(b_):
        d = nearest_per_image(flat[i], flat, max_elements)  # (P, B)
        d[:, i] = math.inf  # never compare an image with itself
        out[i] = d.topk(k, dim=1, largest=False).values.mean(1)
    return out.view(b_, h_, w_)


def reference_patch_scores(
    patches: Tensor, references: Tensor, max_elements: int = MAX_ELEMENTS
) -> Tensor:
    """``patches`` ``(B, h, w, C)``, ``references`` ``(R, h', w', C)`` known-good -> ``(B, h, w)``:
    distance of each patch to its nearest reference patch (a PatchCore memory of every patch)."""
    b_, h_, w_, c_ = patches.shape
    bank = references.reshape(1, -1, c_).float()
    d = nearest_per_image(patches.reshape(-1, c_).float(), bank, max_elements)  # (B*P, 1)
    return d.view(b_, h_, w_)


def rescore_images(scores: Tensor, descriptors: Tensor, k: int) -> Tensor:
    """``scores`` ``(B,)``, ``descriptors`` ``(B, D)`` -> ``(B,)``: each score replaced by the mean
    score of its ``k`` nearest images by cosine similarity (itself included); ``k <= 1`` = off."""
    if k <= 1 or scores.shape[0] <= 1:
        return scores
    k = min(k, scores.shape[0])
    unit = F.normalize(descriptors.float(), dim=1)
    nearest = (unit @ unit.T).topk(k, dim=1).indices  # (B, k); self is the most similar
    return scores[nearest].mean(1)


def upsample(grid: Tensor, size: int) -> Tensor:
    """``(B, h, w)`` -> ``(B, 1, size, size)`` bilinear (maps at the mask resolution)."""
    return F.interpolate(
        grid[:, None].float(), size=(size, size), mode="bilinear", align_corners=False
    )
