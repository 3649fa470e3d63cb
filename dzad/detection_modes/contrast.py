"""``contrast``: c = SG(x0) versus the null hint; ``s = s(x0 hint) - s(null hint)``.

A hint that explains an image's noise no better than no hint marks it anomalous (the sign is fixed
by this reading, never chosen on data). One extra noise-feature pass per image (hint None); the
state is that difference's per-stage SOURCE-normal statistics and its threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from dzad.detection_modes.base import FeaturesOf, ModeSource, mean_std, quantile
from dzad.weighting import stage_means

if TYPE_CHECKING:
    from dzad.config import DetectionConfig
    from dzad.detection import Calibration
    from dzad.noise_features import NoiseFeatures


@dataclass
class ContrastState:
    """``mean`` / ``std`` ``(N,)``: statistics of the stage-mean difference over SOURCE normals;
    ``tau``: the ``threshold_quantile`` quantile of their contrast scores."""

    mean: Tensor
    std: Tensor
    tau: float = math.nan


def contrast_score(
    noise_matrix: Tensor, null_matrix: Tensor, calib: Calibration, state: ContrastState
) -> Tensor:
    """``s(x0 hint) - s(null hint)`` ``(B,)``, standardised with that difference's statistics."""
    diff = stage_means(noise_matrix) - stage_means(null_matrix)
    if calib.standardise:
        diff = (diff - state.mean.to(diff)) / state.std.to(diff)
    return diff @ calib.weights.to(diff)


class ContrastMode:
    needs_labelled = False

    def extra_features(self, features_of: FeaturesOf, state: Any) -> list[NoiseFeatures]:
        return [features_of(null_hint=True)]

    def fit(self, source: ModeSource, calib: Calibration, cfg: DetectionConfig) -> ContrastState:
        if source.normal_of is None:
            raise ValueError("contrast mode: calibration needs the SOURCE normals' null-hint pass")
        noise_matrix, null_matrix = source.normal.F, source.normal_of(null_hint=True).F
        state = ContrastState(*mean_std(stage_means(noise_matrix) - stage_means(null_matrix)))
        state.tau = quantile(
            contrast_score(noise_matrix, null_matrix, calib, state), cfg.threshold_quantile
        )
        return state

    def score(
        self, features: NoiseFeatures, extra: list[NoiseFeatures], calib: Calibration
    ) -> tuple[Tensor, Tensor]:
        if len(extra) != 1:
            raise ValueError("contrast mode needs the null-hint features (hint=None) of the images")
        state: ContrastState = calib.state
        score = contrast_score(features.F, extra[0].F, calib, state)
        return score, score > state.tau

    def threshold(self, calib: Calibration) -> tuple[float, bool]:
        return calib.state.tau, False

    def to_tensors(self, state: ContrastState) -> dict[str, Tensor]:
        return {"mean": state.mean, "std": state.std}

    def to_meta(self, state: ContrastState) -> dict[str, Any]:
        return {"tau": state.tau}

    def from_saved(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> ContrastState:
        return ContrastState(tensors["mean"], tensors["std"], float(meta["tau"]))
