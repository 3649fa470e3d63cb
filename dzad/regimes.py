"""The three scoring regimes (docs/method.md §11.1), one function per regime over a batch of images.

- ``zero-shot``: per image, the paper's method (:class:`dzad.model.DZAD` alone; not here);
- ``batch zero-shot`` (:func:`score_batch`): the images are scored together, unlabelled: MuSc
  mutual scoring of backbone patches (:mod:`dzad.mutual_scoring`), fused with the noise-excess map
  of a DZAD copy self-trained on the batch (:mod:`dzad.adaptation`) when ``dzad_weight > 0``;
- ``few-shot`` (:func:`score_few_shot`): backbone patches against the references' patches
  (PatchCore memory, every degree), fused with the noise-excess map of a DZAD copy fine-tuned on
  the references, measured against the references' own noise error.

Fusion: each map is put on a common scale by the median and MAD of all its patches in the scored
batch (no labels), the DZAD map bilinearly resized onto the backbone grid, and the two summed with
weights ``1 - w`` and ``w``. The image score is the max of the fused grid (MuSc), optionally
re-scored among similar images (batch mode only). ``Scored.parts`` keeps each signal's own grid
and image scores, so one run yields the ablation rows.

Thresholds without labels (:func:`outlier_threshold`, one rule for both): an image is anomalous
when its score is above the median plus 3 scaled MADs of the image scores of its scored batch
(:func:`image_rule`); a pixel is in the predicted region when its map value is above the median
plus ``regime.mask_k`` scaled MADs of every map value of the batch (:func:`map_level`). Both
assume the anomalous images / pixels are a minority of the batch; the SOURCE-calibrated
thresholds belong to the per-image scores and maps and do not apply here. Few-shot has known-good
images, so its image rule (``regime.few_shot_threshold: references``, with 2 or more references)
needs no such assumption: an image is anomalous when its score is above the highest
leave-one-out score of the references (each reference scored against the others by the same
pipeline, on the batch's fusion scale; ``Scored.reference_scores``), and a pixel is in the
predicted region when its map value is above the ``regime.reference_quantile`` quantile (1: every
pixel) of those leave-one-out maps (``Scored.reference_maps``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dzad.adaptation import (
    adapt_network,
    encode,
    excess_grid,
    excess_scale,
    noise_error,
    stitch,
    to_tiles,
)
from dzad.backbones import Backbone
from dzad.config import RegimeConfig
from dzad.decisions import Threshold
from dzad.model import DZAD
from dzad.mutual_scoring import (
    mutual_patch_scores,
    patch_features,
    reference_patch_scores,
    rescore_images,
    upsample,
)

REGIME_LABELS = {
    "zero-shot": "zero-shot",
    "batch-zero-shot": "batch zero-shot",
    "few-shot": "few-shot",
}
IMAGE_OUTLIER_K = 3.0  # the image rule's scaled MADs (a regime's `--threshold auto`)
# Below 3 scores the outlier rule decides nothing: one score is its own median (never flagged), and
# of two the lower is the median and the MAD is 0, so the higher is flagged however close it is.
MIN_OUTLIER_SCORES = 3


@dataclass
class Scored:
    """Image scores ``(B,)`` and maps ``(B,1,S,S)`` of the regime; ``parts``: name -> grid
    ``(B,h,w)`` of each signal (backbone, dzad) before fusion; ``info``: what was used."""

    scores: Tensor
    maps: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)
    descriptors: Tensor | None = None  # (B, D) global features (batch mode's re-scoring)
    reference_scores: Tensor | None = None  # (R,) few-shot: each reference against the others
    reference_grid: Tensor | None = None  # (R,h,w) few-shot: their backbone grids (reusable)
    reference_maps: Tensor | None = None  # (R,1,S,S) few-shot: their leave-one-out fused maps


def _median_mad(values: Tensor) -> tuple[Tensor, Tensor]:
    """Median and MAD over every element of ``values`` (any shape); the median of an even count is
    the lower middle value (:meth:`torch.Tensor.median`)."""
    flat = values.flatten()
    med = flat.median()
    return med, (flat - med).abs().median()


def robust_scale(grid: Tensor, n: int | None = None) -> Tensor:
    """``(B,h,w)`` -> the same, minus the median over every patch of its first ``n`` images (all
    when None), over their MAD: rows past ``n`` are put on the scale of the first ``n``."""
    med, mad = _median_mad(grid[:n].float())
    return (grid.float() - med) / (1.4826 * mad.clamp_min(1e-8))


def outlier_threshold(values: Tensor, k: float) -> float:
    """``median + k * 1.4826 * MAD`` over every element of ``values`` (any shape)."""
    med, mad = _median_mad(values.double())
    return float(med + k * 1.4826 * mad)


def image_rule(
    scores: Tensor, value: float | None = None, references: Tensor | None = None
) -> Threshold:
    """The decision ``image_score > value`` for the image scores ``(B,)`` of one scored batch;
    ``value`` None: the highest of the ``references``' leave-one-out scores ``(R,)`` when given
    (few-shot), else the batch's outlier threshold (:data:`IMAGE_OUTLIER_K`). The normalised
    score spans the batch's own scores (no SOURCE references apply to a regime's scores)."""
    if value is None and references is not None:
        value = float(references.max())
    thr = outlier_threshold(scores, IMAGE_OUTLIER_K) if value is None else value
    return Threshold("image_score", thr, float(scores.min()), float(scores.max()))


def references_rule(cfg: RegimeConfig, n_references: int) -> bool:
    """Whether few-shot decides by its references' leave-one-out scores and maps (else by the
    batch rule: :func:`image_rule` / :func:`map_level` without references): asked for, and at
    least 2 references."""
    return cfg.few_shot_threshold == "references" and n_references >= 2


def map_level(maps: Tensor, cfg: RegimeConfig, references: Tensor | None = None) -> float:
    """The map threshold of one scored batch's maps ``(B,1,S,S)``: above it a pixel is in the
    predicted region (pictures, ``--save-masks``). With ``references`` (few-shot: the known-good
    references' leave-one-out maps ``(R,1,S,S)``, ``Scored.reference_maps``): the
    ``cfg.reference_quantile`` quantile of all their pixels (1: no reference pixel is above it);
    else ``cfg.mask_k`` scaled MADs above the median of all the maps' pixels."""
    if references is not None:
        return float(torch.quantile(references.flatten().double(), cfg.reference_quantile))
    return outlier_threshold(maps, cfg.mask_k)


def map_level_rule(cfg: RegimeConfig, references: bool, batch: str = "batch") -> str:
    """What :func:`map_level` is, in words (reports), with or without ``references``; ``batch``:
    what the scored batch is called (a call, a batch)."""
    if not references:
        return (
            f"median + {cfg.mask_k:g} scaled MADs of all the {batch}'s map values (regime.mask_k)"
        )
    if cfg.reference_quantile == 1:
        return "the highest value of the references' leave-one-out maps"
    return (
        f"the {cfg.reference_quantile:g} quantile of the references' leave-one-out map values "
        "(regime.reference_quantile)"
    )


def fuse(
    backbone_grid: Tensor, dzad_grid: Tensor | None, weight: float, n: int | None = None
) -> Tensor:
    """``(B,h,w)`` backbone and ``(B,h',w')`` DZAD grids -> ``(B,h,w)`` weighted robust sum, each
    on the scale of its first ``n`` rows (all when None); the backbone grid unchanged when there
    is no DZAD signal (so it equals the control)."""
    if dzad_grid is None or weight <= 0:
        return backbone_grid
    fused = robust_scale(backbone_grid, n)
    size = backbone_grid.shape[-2:]
    d = F.interpolate(dzad_grid[:, None].float(), size=size, mode="bilinear", align_corners=False)
    return (1 - weight) * fused + weight * robust_scale(d[:, 0], n)


def _finish(grid: Tensor, size: int, glob: Tensor | None, rescore_k: int) -> tuple[Tensor, Tensor]:
    scores = grid.flatten(1).amax(1)
    if glob is not None:
        scores = rescore_images(scores, glob, rescore_k)
    return scores, upsample(grid, size)


def dzad_grids(
    model: DZAD, images: Tensor, references: Tensor | None, cfg: RegimeConfig, loo: bool = False
) -> tuple[Tensor, dict[str, object]]:
    """The DZAD signal ``(B,h,w)`` of a copy adapted to ``images`` (batch mode, ``references``
    None) or to ``references`` ``(R,3,H,W)`` (few-shot); the reference set of the excess is the
    batch itself or the references. ``adapt_steps == 0``: the frozen SOURCE denoiser. ``loo``
    (few-shot): ``R`` more rows, each reference's excess against the other references on the
    batch's scale (the copy was adapted on all of them, so these rows lean low).

    ``cfg.dzad_tiles`` = n > 1: every image is scored as n x n tiles at the model's own size
    (:func:`dzad.adaptation.to_tiles`), the copy adapted on the tiles, and the tiles' noise errors
    stitched back before the excess, so the grid is finer (2 tiles of 128 px on a 256 px image
    with an 8x8 latent: 16x16) without another model."""
    size, n = model.image_size, cfg.dzad_tiles
    x0, z0 = encode(model, to_tiles(images, size, n))
    if references is None:
        rx0, rz0 = x0, z0
    else:
        rx0, rz0 = encode(model, to_tiles(references, size, n))
    net, kept = model.net, list(range(rz0.shape[0]))
    if cfg.adapt_steps > 0:
        net, kept = adapt_network(model, rx0, rz0, cfg, robust=references is None)
    spatial = stitch(noise_error(model, net, x0, z0), images.shape[-1], n, size)
    ref_spatial = spatial
    if references is not None:
        ref_spatial = stitch(noise_error(model, net, rx0, rz0), references.shape[-1], n, size)
    weights, scale = model.calibration.weights, excess_scale(spatial, ref_spatial)
    grid = excess_grid(spatial, ref_spatial, weights, scale)
    if loo and references is not None:
        rows = [excess_grid(r, o, weights, scale) for r, o in _leave_one_out(ref_spatial)]
        grid = torch.cat([grid, *rows])
    info = {"adapt_steps": cfg.adapt_steps, "adapted_on": len(kept), "dzad_tiles": n}
    return grid.cpu(), info


def _leave_one_out(x: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``x`` ``(R,...)`` -> for each ``i``: ``(x[i:i+1], x without row i)``."""
    return [(x[i : i + 1], torch.cat([x[:i], x[i + 1 :]])) for i in range(len(x))]


def _with_dzad(
    grid: Tensor, model: DZAD | None, images: Tensor, references: Tensor | None, cfg: RegimeConfig
) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
    """The backbone ``grid`` ``(B[+R],h,w)`` fused with the adapted DZAD copy's grid when
    ``cfg.dzad_weight > 0`` (adapted on the batch, or on ``references``): (fused, parts, info).
    ``R`` rows past the ``B`` images: the references' leave-one-out grids (:func:`dzad_grids`
    ``loo``), fused on the images' scale; ``parts`` holds the images' rows only."""
    b = len(images)
    parts: dict[str, Tensor] = {"backbone": grid[:b]}
    if model is None or cfg.dzad_weight <= 0:
        return fuse(grid, None, cfg.dzad_weight), parts, {"dzad_weight": 0.0}
    dz, info = dzad_grids(model, images, references, cfg, loo=len(grid) > b)
    parts["dzad"] = dz[:b]
    fused = fuse(grid, dz, cfg.dzad_weight, b)
    return fused, parts, {**info, "dzad_weight": cfg.dzad_weight}


def mutual_grid(backbone: Backbone, images: Tensor, cfg: RegimeConfig) -> tuple[Tensor, Tensor]:
    """The batch regime's backbone part: grid ``(B,h,w)`` and global descriptors ``(B,D)``. It
    does not depend on the DZAD model, so a caller scoring several models may reuse it."""
    feats, glob = patch_features(backbone, images, cfg.levels, cfg.degrees)
    grid = torch.stack([mutual_patch_scores(f, cfg.mutual_fraction) for f in feats]).mean(0)
    return grid, glob


def score_batch(
    backbone: Backbone,
    images: Tensor,
    cfg: RegimeConfig,
    model: DZAD | None = None,
    backbone_part: tuple[Tensor, Tensor] | None = None,
) -> Scored:
    """Batch zero-shot: ``images`` ``(B,3,S,S)`` at ``cfg.image_size`` scored together;
    ``backbone_part``: :func:`mutual_grid` of the same images and settings, when known."""
    grid, glob = backbone_part or mutual_grid(backbone, images, cfg)
    fused, parts, info = _with_dzad(grid, model, images, None, cfg)
    scores, maps = _finish(fused, images.shape[-1], glob, cfg.rescore_k)
    return Scored(scores, maps, parts, info, glob)


def _memory_grid(feats: list[Tensor], refs: list[Tensor]) -> Tensor:
    """``(B,h,w)``: each patch's distance to its nearest reference patch, averaged over the
    degrees (``feats`` / ``refs``: one tensor per degree, :func:`patch_features`)."""
    per_degree = [reference_patch_scores(f, r) for f, r in zip(feats, refs, strict=True)]
    return torch.stack(per_degree).mean(0)


def _leave_one_out_grid(refs: list[Tensor]) -> Tensor:
    """``(R,h,w)``: each of the R >= 2 references (features per degree) against the other R - 1,
    as the images are scored against them all."""
    rows = []
    for per_degree in zip(*[_leave_one_out(r) for r in refs], strict=True):  # one reference
        one, others = zip(*per_degree, strict=True)
        rows.append(_memory_grid(list(one), list(others)))
    return torch.cat(rows)


def score_few_shot(
    backbone: Backbone,
    images: Tensor,
    references: Tensor,
    cfg: RegimeConfig,
    model: DZAD | None = None,
    degrees: tuple[int, ...] | None = None,
    backbone_part: Tensor | None = None,
    reference_part: Tensor | None = None,
) -> Scored:
    """Few-shot: ``images`` ``(B,3,S,S)`` against known-good ``references`` ``(R,3,S,S)``.

    ``degrees`` overrides ``cfg.degrees`` (the PatchCore control uses ``(3,)``);
    ``backbone_part``: the backbone grid ``(B,h,w)`` of the same inputs and settings (its
    ``Scored.parts["backbone"]``), when known: it does not depend on the DZAD model. With
    ``cfg.few_shot_threshold == "references"`` and R >= 2, ``reference_scores`` ``(R,)`` are the
    references' leave-one-out image scores, fused on the images' scale, and ``reference_maps``
    ``(R,1,S,S)`` their leave-one-out maps (the images' own scores and maps are the same either
    way); ``reference_part``: their backbone grids
    (``Scored.reference_grid`` of the same references and settings), when known."""
    degrees = tuple(degrees or cfg.degrees)
    loo = references_rule(cfg, len(references))
    grid, ref_grid = backbone_part, reference_part if loo else None
    if grid is None or (loo and ref_grid is None):  # the references' features, once
        refs, _ = patch_features(backbone, references, cfg.levels, degrees)
        if grid is None:
            grid = _memory_grid(patch_features(backbone, images, cfg.levels, degrees)[0], refs)
        if loo and ref_grid is None:
            ref_grid = _leave_one_out_grid(refs)
    if loo:
        grid = torch.cat([grid, ref_grid])
    fused, parts, info = _with_dzad(grid, model, images, references, cfg)
    b, size = len(images), images.shape[-1]
    scores, maps = _finish(fused[:b], size, None, 0)
    if not loo:
        return Scored(scores, maps, parts, info)
    ref_scores = fused[b:].flatten(1).amax(1)
    return Scored(
        scores, maps, parts, info, reference_scores=ref_scores, reference_grid=ref_grid,
        reference_maps=upsample(fused[b:], size),  # at the images' map resolution
    )  # fmt: skip
