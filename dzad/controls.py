"""Controls (method.md §11): simple detectors scored on the same images with the same metric code.

A detector that cannot beat these is not worth its training, so every results table carries them:

- ``mean_intensity``: image mean intensity (image score only; no map).
- ``laplacian``: mean absolute Laplacian of the grey image (image score); ``|Laplacian|`` (map).
- ``feature_mean``: no diffusion; per-position distance of backbone features from the SOURCE
  normals' per-channel, per-position mean, standardised by their std (map; image score = max).
- ``feature_knn``: PatchCore-style; distance of each patch feature to its nearest neighbour in a
  memory bank of SOURCE-normal patches (random or greedy-coreset subsample); map and max.
- ``mutual``: transductive ("batch zero-shot", MuSc-like, simplified); each patch's distance to its
  nearest patch in every OTHER target test image, the smallest ``mutual_fraction`` of those
  averaged; map and max. ``score`` must get all test images of a category at once.

Feature controls use the library's backbone (levels ``cfg.control_levels`` with
``cfg.control_local_pool`` local aggregation, pooled onto the grid of the first of those levels,
:func:`dzad.backbones.feature_grid`). Maps are ``(B,1,H,W)``, bilinearly upsampled, then smoothed
like DZAD's maps when ``smooth_sigma > 0``. Image scores are taken before smoothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from dzad.anomaly_map import smooth
from dzad.backbones import Backbone, feature_grid
from dzad.config import EvalConfig
from dzad.mutual_scoring import MAX_ELEMENTS, mutual_patch_scores

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def nearest_distance(queries: Tensor, bank: Tensor) -> Tensor:
    """``(Q,)`` Euclidean distance from each query ``(Q, C)`` to its nearest bank row ``(K, C)``.

    Chunked over queries so at most ``MAX_ELEMENTS`` distances exist at a time.
    """
    step = max(1, MAX_ELEMENTS // max(1, bank.shape[0]))
    return torch.cat([torch.cdist(q, bank).amin(1) for q in queries.split(step)])


def greedy_coreset(x: Tensor, k: int, generator: torch.Generator, proj_dim: int = 64) -> Tensor:
    """Indices ``(k,)`` of a k-center greedy coreset of rows ``x (N, C)`` (PatchCore).

    Distances are measured after a seeded Gaussian random projection to ``proj_dim`` dimensions
    (when ``C`` is larger) to keep each of the ``k`` passes over ``N`` rows cheap.
    """
    if x.shape[1] > proj_dim:
        proj = torch.randn(x.shape[1], proj_dim, generator=generator) / math.sqrt(proj_dim)
        x = x @ proj.to(x)
    chosen = [int(torch.randint(x.shape[0], (1,), generator=generator))]
    dist = (x - x[chosen[0]]).norm(dim=1)
    for _ in range(k - 1):
        chosen.append(int(dist.argmax()))
        dist = torch.minimum(dist, (x - x[chosen[-1]]).norm(dim=1))
    return torch.tensor(chosen)


class Control:
    """``fit(source_batches)`` where relevant; ``score(images) -> (scores (B,), maps | None)``.

    Images ``(B,3,H,W)`` in [0, 1]; maps ``(B,1,H,W)`` (None for an image-only statistic).
    """

    name = ""
    label = ""
    transductive = False  # True: score() needs all target test images of a category at once

    def __init__(
        self, cfg: EvalConfig, backbone: Backbone | None = None, smooth_sigma: float = 0.0
    ) -> None:
        self.cfg, self.backbone, self.smooth_sigma = cfg, backbone, smooth_sigma

    def fit(self, source_batches: Iterable[Tensor]) -> None:
        """Statistics from SOURCE-normal image batches ``(B,3,H,W)``; no-op for trivial controls."""

    def score(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _finish_map(self, grid_map: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``(B,h,w)`` -> image score ``(B,)`` = max, map ``(B,1,H,W)`` upsampled and smoothed."""
        scores = grid_map.flatten(1).amax(1)
        m = F.interpolate(grid_map[:, None], size=size, mode="bilinear", align_corners=False)
        return scores, smooth(m, self.smooth_sigma)


class MeanIntensity(Control):
    name, label = "mean_intensity", "control: mean intensity"

    def score(self, images: Tensor) -> tuple[Tensor, None]:
        return images.float().mean((1, 2, 3)), None


class LaplacianControl(Control):
    name, label = "laplacian", "control: |Laplacian|"

    def score(self, images: Tensor) -> tuple[Tensor, Tensor]:
        grey = images.float().mean(1, keepdim=True)  # (B,1,H,W)
        kernel = _LAPLACIAN.to(grey).view(1, 1, 3, 3)
        lap = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernel).abs()
        return lap.mean((1, 2, 3)), smooth(lap, self.smooth_sigma)


class _FeatureControl(Control):
    """Shared feature extraction: backbone levels pooled onto one grid ``(B, C, h, w)``."""

    def __init__(
        self, cfg: EvalConfig, backbone: Backbone | None = None, smooth_sigma: float = 0.0
    ) -> None:
        if backbone is None:
            raise ValueError(f"control {self.name!r} needs a backbone")
        if not cfg.control_levels or max(cfg.control_levels) >= len(backbone.strides):
            raise ValueError(
                f"evaluate.control_levels {cfg.control_levels} must index the backbone's "
                f"{len(backbone.strides)} levels {backbone.layer_names}"
            )
        super().__init__(cfg, backbone, smooth_sigma)

    @torch.inference_mode()
    def features(self, images: Tensor) -> Tensor:
        device = self.backbone.mean.device
        out = []
        for batch in images.split(self.cfg.batch_size):
            levels = self.backbone(batch.to(device, torch.float32))
            chosen = [levels[i] for i in self.cfg.control_levels]
            size = tuple(chosen[0].shape[-2:])
            out.append(feature_grid(chosen, size, self.cfg.control_local_pool))
        return torch.cat(out)

    def _source_features(self, source_batches: Iterable[Tensor]) -> Tensor:
        feats = [self.features(batch) for batch in source_batches]
        if not feats:
            raise ValueError(f"control {self.name!r}: fit() needs SOURCE-normal images")
        return torch.cat(feats)


class FeatureMeanControl(_FeatureControl):
    name, label = "feature_mean", "control: feature-mean distance (no diffusion)"

    def fit(self, source_batches: Iterable[Tensor]) -> None:
        f = self._source_features(source_batches).double()  # (n, C, h, w)
        if f.shape[0] < 2:
            raise ValueError("control 'feature_mean': fit() needs at least 2 SOURCE-normal images")
        self.mean = f.mean(0).float()
        self.std = f.std(0).clamp_min(1e-6).float()

    def score(self, images: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(images)
        if f.shape[1:] != self.mean.shape:
            raise ValueError(f"feature grid {tuple(f.shape[1:])} differs from the fitted one")
        z = (f - self.mean) / self.std
        dist = z.pow(2).mean(1).sqrt()  # (B, h, w): RMS standardised distance per position
        return self._finish_map(dist.cpu(), tuple(images.shape[-2:]))


class FeatureKnnControl(_FeatureControl):
    name, label = "feature_knn", "control: feature kNN (source bank)"

    def fit(self, source_batches: Iterable[Tensor]) -> None:
        f = self._source_features(source_batches)
        patches = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (n*h*w, C)
        k = self.cfg.knn_bank_size
        if patches.shape[0] > k:
            g = torch.Generator().manual_seed(self.cfg.control_seed)
            if self.cfg.knn_sampler == "greedy":
                keep = greedy_coreset(patches.cpu(), k, g)
            else:
                keep = torch.randperm(patches.shape[0], generator=g)[:k]
            patches = patches[keep.to(patches.device)]
        self.bank = patches.contiguous()

    def score(self, images: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(images)
        b, c, h, w = f.shape
        dist = nearest_distance(f.permute(0, 2, 3, 1).reshape(-1, c), self.bank)
        return self._finish_map(dist.view(b, h, w).cpu(), tuple(images.shape[-2:]))


class MutualScoringControl(_FeatureControl):
    name, label = "mutual", "control: mutual scoring (batch zero-shot)"
    transductive = True

    def score(self, images: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(images)
        if f.shape[0] < 2:
            raise ValueError("control 'mutual' needs at least 2 test images scored together")
        # one degree (control_local_pool); the full MuSc recipe: dzad.regimes.score_batch
        grid = mutual_patch_scores(f.permute(0, 2, 3, 1).cpu(), self.cfg.mutual_fraction)
        return self._finish_map(grid, tuple(images.shape[-2:]))


CONTROLS: dict[str, type[Control]] = {
    cls.name: cls
    for cls in (
        MeanIntensity,
        LaplacianControl,
        FeatureMeanControl,
        FeatureKnnControl,
        MutualScoringControl,
    )
}


def build_control(
    name: str, cfg: EvalConfig, backbone: Backbone | None = None, smooth_sigma: float = 0.0
) -> Control:
    """A control by registry name; feature controls need the backbone used by DZAD's maps."""
    if name not in CONTROLS:
        raise ValueError(f"unknown control {name!r}; choose one of {', '.join(CONTROLS)}")
    return CONTROLS[name](cfg, backbone, smooth_sigma)
