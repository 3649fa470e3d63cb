"""``prototype``: K = 2 prototype conditions, the per-timestep mean SG residuals over SOURCE
normals (k = 0) and SOURCE anomalies (k = 1) of a labelled SOURCE split.

Each image is noised once per condition (null hint plus that prototype's residuals); the class with
the lower weighted error wins, and ``P(anomalous) = softmax(-e_k / T)[1]`` with T fitted on the
labelled SOURCE split (or ``detection.temperature`` as is). The state is the prototypes and T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dzad.detection_modes.base import FeaturesOf, ModeSource
from dzad.weighting import weighted_score

if TYPE_CHECKING:
    from dzad.config import DetectionConfig
    from dzad.detection import Calibration
    from dzad.noise_features import NoiseFeatures, Residuals


@dataclass
class PrototypeState:
    """``prototypes``: ``[normal, anomalous]`` residuals (down skips ``(N*M, ...)`` and middle);
    ``temperature`` T > 0 of the softmax."""

    prototypes: list[Residuals]
    temperature: float = 1.0


def prototype_logits(features_prototypes: list[NoiseFeatures], calib: Calibration) -> Tensor:
    """``(B,K)`` weighted errors under each prototype condition (lower = better explained)."""
    stats = calib.stats()
    return torch.stack([weighted_score(f.F, calib.weights, *stats) for f in features_prototypes], 1)


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


class PrototypeMode:
    needs_labelled = True

    def extra_features(self, features_of: FeaturesOf, state: PrototypeState) -> list[NoiseFeatures]:
        return [features_of(null_hint=True, residuals=p) for p in state.prototypes]

    def fit(self, source: ModeSource, calib: Calibration, cfg: DetectionConfig) -> PrototypeState:
        if source.prototypes_of is None:
            raise ValueError("prototype mode: calibration needs the labelled SOURCE split")
        state = PrototypeState(source.prototypes_of(), cfg.temperature)
        if cfg.fit_temperature:
            if source.labelled_of is None or source.labels is None:
                raise ValueError(
                    "prototype mode: fitting T needs the labelled SOURCE split's features"
                )
            e = prototype_logits(self.extra_features(source.labelled_of, state), calib)
            state.temperature = fit_temperature(e[:, 0] - e[:, 1], source.labels)
        return state

    def score(
        self, features: NoiseFeatures, extra: list[NoiseFeatures], calib: Calibration
    ) -> tuple[Tensor, Tensor]:
        state: PrototypeState = calib.state
        if len(extra) != len(state.prototypes):
            raise ValueError("prototype mode needs one NoiseFeatures per prototype condition")
        e = prototype_logits(extra, calib)
        prob = torch.softmax(-e / state.temperature, dim=1)[:, 1]  # P(anomalous prototype)
        return prob, e[:, 1] < e[:, 0]

    def threshold(self, calib: Calibration) -> tuple[float, bool]:
        # decision e_anomalous < e_normal  <=>  softmax probability > 0.5
        return 0.5, True

    def to_tensors(self, state: PrototypeState) -> dict[str, Tensor]:
        out = {}
        for k, (down, mid) in enumerate(state.prototypes):
            out.update({f"{k}.down.{i}": r for i, r in enumerate(down)})
            out[f"{k}.mid"] = mid
        return out

    def to_meta(self, state: PrototypeState) -> dict[str, Any]:
        return {"temperature": state.temperature}

    def from_saved(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> PrototypeState:
        prototypes = []
        while f"{len(prototypes)}.mid" in tensors:
            k = len(prototypes)
            down = []
            while f"{k}.down.{len(down)}" in tensors:
                down.append(tensors[f"{k}.down.{len(down)}"])
            prototypes.append((down, tensors[f"{k}.mid"]))
        if len(prototypes) != 2:
            raise ValueError(f"prototype mode: {len(prototypes)} saved prototypes (expected 2)")
        return PrototypeState(prototypes, float(meta["temperature"]))
