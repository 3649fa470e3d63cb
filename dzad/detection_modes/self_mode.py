"""``self`` (the default): c = x0 through the SG network; ``s = sum_n w_n mean_m F[n, m]``
(standardised per stage with SOURCE-normal statistics), anomalous when ``s > tau``.

Everything it needs is shared (weights, statistics, tau of :func:`dzad.detection.calibrate`): its
state is empty and it adds no noise-feature pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from dzad.detection_modes.base import FeaturesOf, ModeSource
from dzad.weighting import weighted_score

if TYPE_CHECKING:
    from dzad.config import DetectionConfig
    from dzad.detection import Calibration
    from dzad.noise_features import NoiseFeatures


def self_score(noise_matrix: Tensor, calib: Calibration) -> Tensor:
    """``(B,N,M)`` -> ``(B,)`` weighted (standardised) noise error, + the learned bias (eq. 13)."""
    return weighted_score(noise_matrix, calib.weights, *calib.stats()) + calib.bias


class SelfMode:
    needs_labelled = False

    def extra_features(self, features_of: FeaturesOf, state: Any) -> list[NoiseFeatures]:
        return []

    def fit(self, source: ModeSource, calib: Calibration, cfg: DetectionConfig) -> None:
        return None

    def score(
        self, features: NoiseFeatures, extra: list[NoiseFeatures], calib: Calibration
    ) -> tuple[Tensor, Tensor]:
        score = self_score(features.F, calib)
        return score, score > calib.tau

    def threshold(self, calib: Calibration) -> tuple[float, bool]:
        return calib.tau, False

    def to_tensors(self, state: None) -> dict[str, Tensor]:
        return {}

    def to_meta(self, state: None) -> dict[str, Any]:
        return {}

    def from_saved(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        return None
