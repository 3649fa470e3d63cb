"""SOURCE-only calibration (docs/method.md §7) of a trained network, and rank-fusion references.

The held-out SOURCE normals (:func:`split_holdout`: never used by eq. 8's loop, never target data)
give the per-stage statistics, tau and the eq. 15 gating bank (:func:`dzad.detection.calibrate`),
then the whole pipeline scores them once: those map and detection scores are the references against
which :func:`dzad.scoring.rank_fusion` ranks any later image, alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import Tensor

from dzad.backbones import Backbone
from dzad.config import DZADConfig
from dzad.data.source import ImageSource
from dzad.detection import Calibration, build_prototypes, calibrate
from dzad.detection_modes import ModeSource, get_mode
from dzad.latents import Encoder
from dzad.model import DZAD, map_settings
from dzad.networks import DZADNetwork
from dzad.noise_features import (
    NoiseBank,
    NoiseFeatures,
    Residuals,
    encode_views,
    view_features,
)
from dzad.precision import scoring_precision


def split_holdout(n: int, fraction: float, max_images: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split of ``n`` SOURCE normals into (train, calibration) indices.

    ``fraction`` 0 calibrates on the training images themselves (their errors are optimistic).
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 17))
    n_cal = min(max_images, round(fraction * n)) if fraction > 0 else 0
    if fraction > 0 and (n_cal < 2 or n - n_cal < 1):
        raise ValueError(
            f"{n} source images are too few to hold out {fraction:.0%} for calibration"
        )
    if n_cal == 0:
        return perm, perm[:max_images]
    return perm[n_cal:], perm[:n_cal]


def source_features(
    net: DZADNetwork,
    encoder: Encoder,
    images: Iterator[Tensor],
    bank: NoiseBank,
    alphas_cumprod: Tensor,
    max_batch: int,
    device: torch.device,
    views: tuple[str, ...] = ("identity",),
    *,
    null_hint: bool = False,
    residuals: Residuals | None = None,
) -> NoiseFeatures:
    """Noise features (eq. 11-12) of image batches ``(B,3,H,W)``, averaged over the test-time
    ``views`` as at scoring (:func:`dzad.noise_features.view_features`); hint None when
    ``null_hint``; ``residuals``: a prototype condition's SG residuals (as there)."""
    parts = []
    for x in images:
        x = x.to(device)
        viewed = encode_views(encoder.encode, x, views)
        kw = {"null_hint": null_hint, "residuals": residuals}
        parts.append(view_features(net, viewed, bank, alphas_cumprod, max_batch, **kw))
    return NoiseFeatures.cat(parts)


def needs_labelled(cfg: DZADConfig) -> bool:
    """Whether calibrating ``cfg`` needs a labelled SOURCE split (normals + anomalies)."""
    return cfg.weighting.name == "learned" or get_mode(cfg.detection.mode).needs_labelled


def position_subset(n: int, cfg: DZADConfig) -> Tensor:
    """Indices ``(P,)`` of the SOURCE normals behind the per-position error statistics: a seeded
    subset of all ``n`` (training images included: the statistic is the denoiser's positional
    error pattern, and the held-out split alone is a handful of images for small sources)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    return perm[: cfg.detection.position_images].sort().values


def calibrate_on_source(
    cfg: DZADConfig,
    net: DZADNetwork,
    encoder: Encoder,
    bank: NoiseBank,
    alphas_cumprod: Tensor,
    normals: ImageSource,
    normal_idx: Tensor,
    device: torch.device,
    labelled: tuple[ImageSource, Tensor] | None = None,
    *,
    backbone: Backbone | None,
) -> Calibration:
    """Calibration (docs/method.md §7) on held-out SOURCE normals (+ a labelled SOURCE split).

    Then the pipeline itself (:class:`dzad.model.DZAD`; ``backbone``: ``dzad.model.map_backbone``)
    scores the same normals: their map and detection scores are the rank-fusion references.
    Every network forward runs in ``noise.precision`` (:mod:`dzad.precision`), as scoring's do;
    the statistics are fp32.
    """
    mb, bs, views = cfg.noise.max_batch, cfg.evaluate.batch_size, cfg.noise.views
    net.eval()

    def feats(src: ImageSource, idx: Tensor, **kw: Any) -> NoiseFeatures:
        """Noise features of ``src[idx]``; ``kw`` as :func:`dzad.noise_features.view_features`."""
        with scoring_precision(cfg.noise.precision, device):
            return source_features(
                net, encoder, src.batches(idx, bs), bank, alphas_cumprod, mb, device, views, **kw
            )

    kwargs: dict[str, Any] = {"seed": cfg.seed}
    normal = feats(normals, normal_idx)
    source = ModeSource(normal, normal_of=partial(feats, normals, normal_idx))
    if cfg.detection.position_images:
        kwargs["features_position"] = feats(normals, position_subset(len(normals), cfg))
    if needs_labelled(cfg):
        if labelled is None:
            raise ValueError(
                f"weighting {cfg.weighting.name!r} / detection mode {cfg.detection.mode!r}: a "
                "labelled SOURCE split is needed (normals + anomalies: the source test split or "
                "synthetic pseudo-anomalies)"
            )
        src, labels = labelled
        all_idx = torch.arange(len(src))
        kwargs["labels"] = source.labels = labels
        if cfg.weighting.name == "learned":
            kwargs["features_labelled"] = feats(src, all_idx)
        source.labelled_of = partial(feats, src, all_idx)
        source.prototypes_of = partial(
            labelled_prototypes, cfg, net, encoder, bank, alphas_cumprod, src, labels, device
        )
    calib = calibrate(normal, cfg.weighting, cfg.detection, alphas_cumprod, source=source, **kwargs)
    return reference_scores(
        DZAD(cfg, encoder, net, bank, calib, backbone).to(device), normals, normal_idx
    )


def labelled_prototypes(
    cfg: DZADConfig,
    net: DZADNetwork,
    encoder: Encoder,
    bank: NoiseBank,
    alphas_cumprod: Tensor,
    src: ImageSource,
    labels: Tensor,
    device: torch.device,
) -> list[Residuals]:
    """Per-class mean SG residuals ``[normal, anomalous]`` of the labelled SOURCE split ``src``
    (:func:`dzad.detection.build_prototypes`), encoded in ``noise.precision`` as at scoring."""
    bs = cfg.evaluate.batch_size
    with scoring_precision(cfg.noise.precision, device):
        batches = []
        for s in range(0, len(src), bs):
            x = src.get(torch.arange(s, min(s + bs, len(src)))).to(device)
            batches.append((encoder.encode(x).float(), x, labels[s : s + bs]))
        return build_prototypes(net, batches, bank, alphas_cumprod, cfg.noise.max_batch)


def reference_scores(model: DZAD, normals: ImageSource, idx: Tensor) -> Calibration:
    """``model.calibration`` plus the map and detection scores ``(R,)`` of SOURCE normals ``idx``.

    They make a single image's fused score a rank among SOURCE normals (``dzad.scoring``), valid
    while the map settings stay those recorded in ``ref_settings``.
    """
    maps, dets = [], []
    for x in normals.batches(idx, model.cfg.evaluate.batch_size):
        out = model(x)
        maps.append(out.map_score.float().cpu())
        dets.append(out.detection_score.float().cpu())
    return replace(
        model.calibration,
        ref_map=torch.cat(maps),
        ref_detection=torch.cat(dets),
        ref_settings=map_settings(model.cfg),
    )
