"""Detection (eq. 10-12): calibration on SOURCE data only, shared by every detection mode.

:func:`calibrate` fits what every mode uses: per-stage statistics of SOURCE-normal stage means, the
stage weights (eq. 13), tau (a quantile of SOURCE-normal self scores), the eq. 15 gating bank and
the per-position statistics of the noise-excess map; then the configured mode
(:mod:`dzad.detection_modes`) fits its own state on top. :func:`detect` scores with that mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from dzad.config import DetectionConfig, WeightingConfig
from dzad.detection_modes import ModeSource, get_mode
from dzad.detection_modes.base import mean_std, quantile
from dzad.detection_modes.self_mode import self_score
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
    weights_by_name,
)

_SCALARS = ("tau", "weighting", "standardise", "bias", "n_normal")


@dataclass
class Calibration:
    """Everything detection needs, fitted on SOURCE data only; saved with the checkpoint.

    stage_mean/stage_std ``(N,)``: per-stage statistics of mean_m F over source normals; weights
    ``(N,)``; normal_spatial ``(K,h,w)`` / normal_keys ``(K,N)``: bank of source-normal weighted
    error maps and their (standardised) stage means, for eq. 15's gating; tau: the threshold of
    the self score. ``mode`` names the detection mode (:data:`dzad.detection_modes.MODES`) and
    ``state`` is what that mode fitted (None for ``self``).
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
    mode: str = "self"
    state: Any = None
    ref_map: Tensor | None = None
    ref_detection: Tensor | None = None
    ref_settings: dict[str, Any] | None = None
    position_mean: Tensor | None = None
    position_std: Tensor | None = None

    def stats(self) -> tuple[Tensor | None, Tensor | None]:
        """(mean, std) to standardise stage means with, or (None, None)."""
        return (self.stage_mean, self.stage_std) if self.standardise else (None, None)

    def to_tensors(self) -> dict[str, Tensor]:
        """Tensor fields as a flat dict (for ``extra.safetensors``); the mode's under ``mode.``."""
        out = {
            k: getattr(self, k)
            for k in ("stage_mean", "stage_std", "weights", "normal_spatial", "normal_keys")
        }
        if self.ref_map is not None and self.ref_detection is not None:
            out["ref_map"], out["ref_detection"] = self.ref_map, self.ref_detection
        if self.position_mean is not None and self.position_std is not None:
            out["position_mean"], out["position_std"] = self.position_mean, self.position_std
        mode = get_mode(self.mode).to_tensors(self.state)
        out.update({f"mode.{k}": v for k, v in mode.items()})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def to_meta(self) -> dict[str, Any]:
        """Scalar fields (for ``dzad.json``); NaN becomes None so the JSON stays standard."""
        out = {k: getattr(self, k) for k in _SCALARS}
        out["mode"] = self.mode
        out["mode_state"] = _json_floats(get_mode(self.mode).to_meta(self.state))
        if self.ref_settings is not None:
            out["ref_settings"] = self.ref_settings
        return _json_floats(out)

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Calibration:
        """Inverse of :meth:`to_tensors` + :meth:`to_meta`; ValueError on unknown fields."""
        names = {f.name for f in fields(cls)} - {"state"}
        unknown = set(meta) - names - {"mode_state"}
        if unknown:
            raise ValueError(f"calibration: unknown field(s) {sorted(unknown)}")
        if "mode" not in meta or "mode_state" not in meta:
            raise ValueError("calibration: no detection mode (`mode` / `mode_state`) recorded")
        scalars = {k: (math.nan if v is None else v) for k, v in meta.items() if k != "mode_state"}
        mode = get_mode(scalars["mode"])
        mode_meta = {k: (math.nan if v is None else v) for k, v in meta["mode_state"].items()}
        n = len("mode.")
        state = mode.from_saved(
            {k[n:]: v for k, v in tensors.items() if k.startswith("mode.")}, mode_meta
        )
        plain = {k: v for k, v in tensors.items() if not k.startswith("mode.")}
        return cls(**plain, **scalars, state=state)


def _json_floats(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


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


def calibrate(
    features_normal: NoiseFeatures,
    weighting: WeightingConfig,
    detection: DetectionConfig,
    alphas_cumprod: Tensor,
    *,
    features_labelled: NoiseFeatures | None = None,
    labels: Tensor | None = None,
    features_position: NoiseFeatures | None = None,
    source: ModeSource | None = None,
    seed: int = 0,
) -> Calibration:
    """Fit the detector on SOURCE features only (never target data).

    ``features_normal``: held-out source normals ``F`` ``(B,N,M)``; ``features_labelled`` +
    ``labels``: a labelled source split (learned weights); ``features_position``: SOURCE normals
    for :func:`excess_map`'s statistics; ``source``: what ``detection.mode`` fits its state on
    (default: the normals' features and ``labels`` alone, enough for ``self``).
    """
    noise_matrix = features_normal.F
    b_, n_ = noise_matrix.shape[:2]
    if b_ < 2:
        raise ValueError("calibration needs at least 2 SOURCE-normal images")
    mean, std = mean_std(stage_means(noise_matrix))  # (N,) over the (B,N) stage means
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
        mode=detection.mode,
    )
    calib.tau = quantile(self_score(noise_matrix, calib), detection.threshold_quantile)
    # eq. 15 gating bank: K seeded source normals, their weighted error maps and stage-mean keys
    keep = torch.randperm(b_, generator=torch.Generator().manual_seed(seed))[
        : detection.gating_bank_size
    ]
    calib.normal_spatial = weighted_map(features_normal.spatial[keep], calib)
    calib.normal_keys = stage_means(noise_matrix[keep], use_mean, use_std)
    if features_position is not None:
        sp = features_position.spatial.float()  # (P,N,h,w)
        if sp.shape[0] < 2:
            raise ValueError("per-position statistics need at least 2 SOURCE-normal images")
        calib.position_mean, calib.position_std = mean_std(sp)
    source = source or ModeSource(features_normal, labels=labels)
    calib.state = get_mode(detection.mode).fit(source, calib, detection)
    return calib


def detect(
    features: NoiseFeatures, calib: Calibration, extra: list[NoiseFeatures] | None = None
) -> tuple[Tensor, Tensor]:
    """Continuous score ``(B,)`` and decision ``(B,)`` bool (True = anomalous) of ``calib.mode``.

    ``extra``: the mode's extra noise features of the same images (:func:`mode_features`).
    """
    return get_mode(calib.mode).score(features, extra or [], calib)


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
    features_of: Callable[..., NoiseFeatures], calib: Calibration
) -> tuple[NoiseFeatures, list[NoiseFeatures]]:
    """The noise features ``calib.mode`` needs: ``features`` (the SG hint of each image) and the
    mode's extra passes (:func:`detect`'s ``extra``).

    ``features_of(**kw)``: the images' noise features (``dzad.noise_features.view_features`` bound
    to the network, the encoded views and the bank; ``null_hint`` / ``residuals`` as there).
    """
    return features_of(), get_mode(calib.mode).extra_features(features_of, calib.state)
