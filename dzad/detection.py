"""Detection (eq. 10-12, docs/method.md §7): calibration on SOURCE data only, and the three modes.

- ``self`` (default): c = x0 through the SG network; ``s = sum_n w_n mean_m F[n, m]`` (standardised
  per stage with SOURCE-normal statistics when ``standardise``); anomalous when ``s > tau``, tau a
  quantile of SOURCE-normal scores.
- ``contrast``: c = SG(x0) versus the null hint; ``s = s(x0 hint) - s(null hint)``: a hint that
  explains an image's noise no better than no hint marks it anomalous (the sign is fixed by this
  reading, never chosen on data). :func:`mode_features` runs the noise features twice (hint, None).
- ``prototype``: K = 2 prototype conditions (per-timestep mean SG residuals over SOURCE normals and
  SOURCE anomalies, :func:`build_prototypes`); the class with the lower weighted error wins, and
  ``P(anomalous) = softmax(-e_k / T)`` with T fitted on the labelled SOURCE split.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from dzad.config import DetectionConfig, WeightingConfig
from dzad.networks import DZADNetwork
from dzad.noise_features import (
    NoiseBank,
    NoiseFeatures,
    Residuals,
    sg_residual_means,
)
from dzad.weighting import (
    fit_learned_weights,
    parse_name,
    stage_means,
    weighted_score,
    weights_by_name,
)


@dataclass
class Calibration:
    """Everything detection needs, fitted on SOURCE data only; saved with the checkpoint.

    stage_mean/stage_std ``(N,)``: per-stage statistics of mean_m F over source normals; weights
    ``(N,)``; normal_spatial ``(K,h,w)`` / normal_keys ``(K,N)``: bank of source-normal weighted
    error maps and their (standardised) stage means, for eq. 15's gating; optional contrast
    statistics and prototype residuals (down skips ``(N*M, ...)`` and middle per class).
    ``ref_map`` / ``ref_detection`` ``(R,)``: map and detection scores of the held-out SOURCE
    normals, the references of :func:`dzad.scoring.rank_fusion`, valid under the map settings
    ``ref_settings`` (``dzad.model.map_settings``) they were computed with.
    ``position_mean`` / ``position_std`` ``(N,h,w)``: per-stage, per-position statistics of the
    SOURCE normals' spatial errors, for :func:`excess_map` (None when not computed).
    """

    stage_mean: Tensor
    stage_std: Tensor
    tau: float
    weights: Tensor
    normal_spatial: Tensor
    normal_keys: Tensor
    weighting: str = "dzad"
    standardise: bool = True
    bias: float = 0.0  # learned weighting's intercept
    n_normal: int = 0
    contrast_mean: Tensor | None = None
    contrast_std: Tensor | None = None
    tau_contrast: float = math.nan
    prototypes: list[Residuals] = field(default_factory=list)  # [normal, anomalous]
    temperature: float = 1.0
    ref_map: Tensor | None = None
    ref_detection: Tensor | None = None
    ref_settings: dict[str, Any] | None = None
    position_mean: Tensor | None = None
    position_std: Tensor | None = None

    def stats(self) -> tuple[Tensor | None, Tensor | None]:
        """(mean, std) to standardise stage means with, or (None, None)."""
        return (self.stage_mean, self.stage_std) if self.standardise else (None, None)

    def to_tensors(self) -> dict[str, Tensor]:
        """Tensor fields as a flat dict (for ``extra.safetensors``)."""
        out = {
            k: getattr(self, k)
            for k in ("stage_mean", "stage_std", "weights", "normal_spatial", "normal_keys")
        }
        if self.contrast_mean is not None and self.contrast_std is not None:
            out["contrast_mean"], out["contrast_std"] = self.contrast_mean, self.contrast_std
        if self.ref_map is not None and self.ref_detection is not None:
            out["ref_map"], out["ref_detection"] = self.ref_map, self.ref_detection
        if self.position_mean is not None and self.position_std is not None:
            out["position_mean"], out["position_std"] = self.position_mean, self.position_std
        for k, (down, mid) in enumerate(self.prototypes):
            out.update({f"prototype.{k}.down.{i}": r for i, r in enumerate(down)})
            out[f"prototype.{k}.mid"] = mid
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def to_meta(self) -> dict[str, Any]:
        """Scalar fields (for ``dzad.json``); NaN becomes None so the JSON stays standard."""
        scalars = (
            "tau",
            "weighting",
            "standardise",
            "bias",
            "n_normal",
            "tau_contrast",
            "temperature",
        )
        out = {k: getattr(self, k) for k in scalars}
        out = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
        if self.ref_settings is not None:
            out["ref_settings"] = self.ref_settings
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Calibration:
        names = {f.name for f in fields(cls)}
        unknown = set(meta) - names
        if unknown:
            raise ValueError(f"calibration: unknown field(s) {sorted(unknown)}")
        scalars = {k: (math.nan if v is None else v) for k, v in meta.items()}
        prototypes = []
        k = 0
        while f"prototype.{k}.mid" in tensors:
            i, down = 0, []
            while f"prototype.{k}.down.{i}" in tensors:
                down.append(tensors[f"prototype.{k}.down.{i}"])
                i += 1
            prototypes.append((down, tensors[f"prototype.{k}.mid"]))
            k += 1
        plain = {k: v for k, v in tensors.items() if not k.startswith("prototype.")}
        return cls(**plain, **scalars, prototypes=prototypes)


def weighted_map(spatial: Tensor, calib: Calibration) -> Tensor:
    """``(B,N,h,w)`` -> ``(B,h,w)``: eq. 13's weighting per position (spatial mean = score)."""
    x = spatial.float()
    mean, std = calib.stats()
    if mean is not None and std is not None:
        x = (x - mean.to(x)[:, None, None]) / std.to(x)[:, None, None]
    return torch.einsum("bnhw,n->bhw", x, calib.weights.to(x))


def excess_map(spatial: Tensor, calib: Calibration) -> Tensor:
    """``(B,N,h,w)`` -> ``(B,h,w)``: ``sum_n w_n max(z_n(p), 0)^2`` (the noise-excess map).

    ``z_n(p)`` standardises the spatial error of stage n at position p with the SOURCE normals'
    statistics at that stage AND position: the denoiser's error has a positional pattern of its
    own (e.g. higher along the borders) that a per-stage z-score (:func:`weighted_map`) leaves
    in, and that pattern, not the defects, dominated real-image maps (method.md §9.4). Only an error
    above what SOURCE normals show there counts (the sign eq. 15's gate uses); squared so that a
    few clearly-exceeding stages outweigh many marginal ones. Weights w_n as eq. 13.
    """
    if calib.position_mean is None or calib.position_std is None:
        raise ValueError(
            "the noise-excess map needs per-position SOURCE statistics; this calibration has "
            "none (detection.position_images was 0 or the checkpoint predates them): retrain"
        )
    mean, std = calib.position_mean.to(spatial), calib.position_std.to(spatial)
    if mean.shape != spatial.shape[1:]:
        raise ValueError(f"position statistics {tuple(mean.shape)} vs maps {tuple(spatial.shape)}")
    excess = ((spatial.float() - mean) / std).clamp_min(0).pow(2)
    return torch.einsum("bnhw,n->bhw", excess, calib.weights.to(excess))


def self_score(F: Tensor, calib: Calibration) -> Tensor:
    """``(B,N,M)`` -> ``(B,)`` weighted (standardised) noise error, + the learned bias (eq. 13)."""
    return weighted_score(F, calib.weights, *calib.stats()) + calib.bias


def contrast_score(F: Tensor, F_null: Tensor, calib: Calibration) -> Tensor:
    """``s(x0 hint) - s(null hint)``, standardised with that difference's statistics -> ``(B,)``."""
    if calib.contrast_mean is None or calib.contrast_std is None:
        raise ValueError("contrast mode: the calibration has no null-hint statistics")
    diff = stage_means(F) - stage_means(F_null)
    if calib.standardise:
        diff = (diff - calib.contrast_mean.to(diff)) / calib.contrast_std.to(diff)
    return diff @ calib.weights.to(diff)


def prototype_logits(features_prototypes: list[NoiseFeatures], calib: Calibration) -> Tensor:
    """``(B,K)`` weighted errors under each prototype condition (lower = better explained)."""
    stats = calib.stats()
    return torch.stack([weighted_score(f.F, calib.weights, *stats) for f in features_prototypes], 1)


def _quantile(x: Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q))


def _mean_std(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.mean(0), x.std(0, unbiased=x.shape[0] > 1).clamp_min(1e-12)


def fit_temperature(d: Tensor, labels: Tensor) -> float:
    """T > 0 minimising the NLL of ``P(anomalous) = sigmoid(d / T)`` on labelled SOURCE data."""
    y = labels.double()
    d = d.double()
    scale = float(d.abs().mean().clamp_min(1e-12))
    grid = scale * torch.logspace(-3, 3, 241, dtype=torch.float64)
    z = d[None, :] / grid[:, None]
    nll = torch.nn.functional.binary_cross_entropy_with_logits(
        z, y.expand_as(z), reduction="none"
    ).mean(1)
    return float(grid[int(nll.argmin())])


def calibrate(
    features_normal: NoiseFeatures,
    weighting: WeightingConfig,
    detection: DetectionConfig,
    alphas_cumprod: Tensor,
    *,
    features_labelled: NoiseFeatures | None = None,
    labels: Tensor | None = None,
    features_normal_null: NoiseFeatures | None = None,
    prototypes: list[Residuals] | None = None,
    features_labelled_prototypes: list[NoiseFeatures] | None = None,
    features_position: NoiseFeatures | None = None,
    seed: int = 0,
) -> Calibration:
    """Fit the detector on SOURCE features only (never target data).

    ``features_normal``: held-out source normals ``F`` ``(B,N,M)``; ``features_labelled`` +
    ``labels``: a labelled source split (learned weights); ``features_normal_null``: the same
    normals with the null hint (contrast mode); ``prototypes`` + ``features_labelled_prototypes``:
    prototype mode; ``features_position``: SOURCE normals for :func:`excess_map`'s statistics.
    """
    F = features_normal.F
    b_, n_ = F.shape[:2]
    if b_ < 2:
        raise ValueError("calibration needs at least 2 SOURCE-normal images")
    normal_means = stage_means(F)  # (B,N)
    mean, std = _mean_std(normal_means)
    use_mean, use_std = (mean, std) if detection.standardise else (None, None)
    bias = 0.0
    if parse_name(weighting.name, weighting.k)[0] == "learned":
        if features_labelled is None or labels is None:
            raise ValueError(
                "weighting 'learned' needs a labelled SOURCE split (normals + anomalies)"
            )
        x = stage_means(features_labelled.F, use_mean, use_std)
        weights, bias = fit_learned_weights(x, labels, weighting.learned_c)
    else:
        weights = weights_by_name(weighting.name, weighting.k, n_, alphas_cumprod)
    calib = Calibration(
        stage_mean=mean,
        stage_std=std,
        tau=math.nan,
        weights=weights,
        normal_spatial=torch.zeros(0),
        normal_keys=torch.zeros(0),
        weighting=weighting.name,
        standardise=detection.standardise,
        bias=bias,
        n_normal=b_,
    )
    calib.tau = _quantile(self_score(F, calib), detection.threshold_quantile)
    # eq. 15 gating bank: K seeded source normals, their weighted error maps and stage-mean keys
    keep = torch.randperm(b_, generator=torch.Generator().manual_seed(seed))[
        : detection.gating_bank_size
    ]
    calib.normal_spatial = weighted_map(features_normal.spatial[keep], calib)
    calib.normal_keys = stage_means(F[keep], use_mean, use_std)
    if features_position is not None:
        sp = features_position.spatial.float()  # (P,N,h,w)
        if sp.shape[0] < 2:
            raise ValueError("per-position statistics need at least 2 SOURCE-normal images")
        calib.position_mean, calib.position_std = _mean_std(sp)
    if features_normal_null is not None:
        diff = normal_means - stage_means(features_normal_null.F)
        calib.contrast_mean, calib.contrast_std = _mean_std(diff)
        calib.tau_contrast = _quantile(
            contrast_score(F, features_normal_null.F, calib), detection.threshold_quantile
        )
    if prototypes is not None:
        calib.prototypes = prototypes
        calib.temperature = detection.temperature
        if detection.fit_temperature:
            if features_labelled_prototypes is None or labels is None:
                raise ValueError(
                    "prototype mode: fitting T needs the labelled SOURCE split's features"
                )
            e = prototype_logits(features_labelled_prototypes, calib)
            calib.temperature = fit_temperature(e[:, 0] - e[:, 1], labels)
    return calib


def detect(
    features: NoiseFeatures,
    calib: Calibration,
    cfg: DetectionConfig,
    *,
    features_null: NoiseFeatures | None = None,
    features_prototypes: list[NoiseFeatures] | None = None,
) -> tuple[Tensor, Tensor]:
    """Continuous score ``(B,)`` and decision ``(B,)`` bool (True = anomalous) for ``cfg.mode``.

    ``contrast`` needs ``features_null`` (same images, hint None); ``prototype`` needs
    ``features_prototypes`` (one NoiseFeatures per prototype); :func:`mode_features` runs them all.
    """
    if cfg.mode == "self":
        score = self_score(features.F, calib)
        return score, score > calib.tau
    if cfg.mode == "contrast":
        if features_null is None:
            raise ValueError("contrast mode needs features_null (noise features with hint=None)")
        score = contrast_score(features.F, features_null.F, calib)
        return score, score > calib.tau_contrast
    if cfg.mode == "prototype":
        if not calib.prototypes:
            raise ValueError("prototype mode: the calibration has no prototypes")
        if features_prototypes is None or len(features_prototypes) != len(calib.prototypes):
            raise ValueError("prototype mode needs one NoiseFeatures per prototype condition")
        e = prototype_logits(features_prototypes, calib)
        prob = torch.softmax(-e / calib.temperature, dim=1)[:, 1]  # P(anomalous prototype)
        return prob, e[:, 1] < e[:, 0]
    raise ValueError(f"unknown detection mode {cfg.mode!r}")


def build_prototypes(
    net: DZADNetwork,
    batches: list[tuple[Tensor, Tensor, Tensor]],
    bank: NoiseBank,
    alphas_cumprod: Tensor,
    max_batch: int,
) -> list[Residuals]:
    """Per-timestep mean SG residuals of SOURCE normals (k=0) and SOURCE anomalies (k=1).

    ``batches``: ``(z0 (B,C,h,w), x0 (B,3,H,W), labels (B,))`` of a labelled SOURCE split (its
    test split or synthetic pseudo-anomalies). Raises when either class is missing.
    """
    sums: list[Residuals | None] = [None, None]
    counts = [0, 0]
    for z0, x0, labels in batches:
        hint = net.hint(x0, z0)
        for k in (0, 1):
            sel = labels.to(torch.long) == k
            if not bool(sel.any()):
                continue
            down, mid = sg_residual_means(net, z0[sel], hint[sel], bank, alphas_cumprod, max_batch)
            prev = sums[k]
            if prev is not None:
                down = [a + b for a, b in zip(prev[0], down, strict=True)]
                mid = prev[1] + mid
            sums[k] = (down, mid)
            counts[k] += int(sel.sum())
    if counts[1] == 0 or counts[0] == 0:
        raise ValueError(
            "prototype mode needs labelled SOURCE normals and anomalies (the source test split or "
            f"synthetic pseudo-anomalies); got {counts[0]} normal, {counts[1]} anomalous images"
        )
    out: list[Residuals] = []
    for k in (0, 1):
        s = sums[k]
        assert s is not None
        out.append(([d / counts[k] for d in s[0]], s[1] / counts[k]))
    return out


def mode_features(
    features_of: Callable[..., NoiseFeatures],
    prototypes: list[Residuals],
    cfg: DetectionConfig,
) -> tuple[NoiseFeatures, dict[str, Any]]:
    """The noise features ``cfg.mode`` needs: ``features`` (the SG hint of each image) and
    :func:`detect`'s kwargs.

    ``features_of(**kw)``: the images' noise features (``dzad.noise_features.view_features`` bound
    to the network, the encoded views and the bank; ``null_hint`` / ``residuals`` as there).
    ``contrast`` adds a null-hint pass, ``prototype`` one pass per condition in ``prototypes``.
    """
    features = features_of()
    extra: dict[str, Any] = {}
    if cfg.mode == "contrast":
        extra["features_null"] = features_of(null_hint=True)
    elif cfg.mode == "prototype":
        extra["features_prototypes"] = [
            features_of(null_hint=True, residuals=p) for p in prototypes
        ]
    return features, extra
