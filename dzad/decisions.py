"""A checkpoint's thresholds, as the heat maps and the normalised score use them.

:func:`decision_threshold` is the rule behind a row's ``decision`` (the SOURCE-calibrated tau on
the detection score, or a given number on the image score) and normalises a score to [0, 1] with
the decision at 0.5, as anomalib does: ``clip((s - threshold) / (high - low) + 0.5, 0, 1)`` where
``low``..``high`` is the span of the held-out SOURCE normals' scores of the same kind (stored in the
calibration). :func:`map_threshold` is the calibrated level of the anomaly map: above it a pixel is
in the predicted defect region.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dzad.detection_modes import get_mode
from dzad.model import DZAD
from dzad.scoring import rank_fusion

NORMALISED_NOTE = "0.5 at the decision threshold, clipped to [0, 1] (anomalib's rule)"
# which stored reference scores span each score kind (the image score: anomaly_map.fusion's)
_FUSION_KEY = {"map": "map_score", "detection": "detection_score", "rank": "fused_score"}


@dataclass(frozen=True)
class Threshold:
    """Decision rule ``row[key] > value``.

    ``low``/``high``: span of the SOURCE-normal reference scores of that kind (None: the checkpoint
    stores none, the score is not normalised); ``probability``: the score is already a probability
    with the decision at 0.5 (prototype detection), so it is its own normalised score.
    """

    key: str
    value: float
    low: float | None = None
    high: float | None = None
    probability: bool = False

    def normalise(self, score: float) -> float | None:
        """Score in [0, 1], above 0.5 exactly when ``score > value``; None when not normalisable."""
        if self.probability:
            return float(score)
        if self.low is None or self.high is None:
            return None
        span = max(self.high - self.low, 1e-12)
        return float(min(1.0, max(0.0, (score - self.value) / span + 0.5)))


def _references(model: DZAD) -> dict[str, torch.Tensor]:
    """SOURCE-normal reference scores ``(R,)`` per score kind that are valid for ``model``."""
    calib = model.calibration
    refs: dict[str, torch.Tensor] = {}
    if calib.ref_detection is not None:  # detection does not depend on the map settings
        refs["detection_score"] = calib.ref_detection
    pair = model.fusion_references()
    if pair is not None:
        refs["map_score"] = pair[0]
        refs["fused_score"] = rank_fusion(*pair, *pair)
    return refs


def _span(ref: torch.Tensor | None) -> tuple[float | None, float | None]:
    return (None, None) if ref is None else (float(ref.min()), float(ref.max()))


def decision_threshold(model: DZAD, value: float | None = None) -> Threshold:
    """The rule the model's decision follows (``value`` None) or ``image_score > value``."""
    refs = _references(model)
    if value is not None:
        key = _FUSION_KEY[model.cfg.anomaly_map.fusion]
        return Threshold("image_score", value, *_span(refs.get(key)))
    tau, probability = get_mode(model.calibration.mode).threshold(model.calibration)
    if probability:  # a probability's threshold needs no SOURCE span to be read
        return Threshold("detection_score", tau, probability=True)
    return Threshold("detection_score", float(tau), *_span(refs.get("detection_score")))


def map_threshold(model: DZAD) -> tuple[float | None, str]:
    """(level, where it comes from): the ``detection.threshold_quantile`` quantile of the held-out
    SOURCE normals' map scores, or (None, why there is none)."""
    problem = model.reference_problem()
    if problem is not None:
        return None, f"no calibrated map threshold ({problem})"
    ref = model.calibration.ref_map
    assert ref is not None  # reference_problem() checked it
    q = model.cfg.detection.threshold_quantile
    level = float(torch.quantile(ref.double(), q))
    return (
        level,
        f"map threshold {level:.4g}: {q:g} quantile of {len(ref)} SOURCE-normal map scores",
    )
