"""What a detection mode is: the :class:`DetectionMode` protocol and the SOURCE data its fit sees.

A mode turns the noise features of an image into a score s and a decision. The shared statistics
(per-stage mean / std, weights, the self-score threshold tau, the gating bank) are fitted for every
mode by :func:`dzad.detection.calibrate`; a mode adds only what is its own (its *state*: e.g. the
null-hint statistics of ``contrast``), fitted on SOURCE data only and saved with the checkpoint.

This module and the modes import no config or network code at run time (annotations only): the
config's validation looks mode names up in the registry (:data:`dzad.detection_modes.MODES`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dzad.config import DetectionConfig
    from dzad.detection import Calibration
    from dzad.noise_features import NoiseFeatures, Residuals

# ``features_of(**kw)``: noise features of a fixed set of images, ``kw`` as
# ``dzad.noise_features.view_features`` (``null_hint``, ``residuals``); no kw = the SG hint of x0
FeaturesOf = Callable[..., "NoiseFeatures"]


@dataclass
class ModeSource:
    """The SOURCE data a mode's fit may read (never target data).

    ``normal``: features ``F`` ``(B,N,M)`` of the held-out SOURCE normals (SG hint of x0);
    ``normal_of``: the same normals under another condition; ``labels`` ``(L,)`` (1 = anomalous)
    and ``labelled_of``: the labelled SOURCE split (normals + anomalies) and its features;
    ``prototypes_of()``: that split's per-class mean SG residuals ``[normal, anomalous]``
    (:func:`dzad.detection.build_prototypes`). Each is None when the caller has none.
    """

    normal: NoiseFeatures
    normal_of: FeaturesOf | None = None
    labels: Tensor | None = None
    labelled_of: FeaturesOf | None = None
    prototypes_of: Callable[[], list[Residuals]] | None = None


class DetectionMode(Protocol):
    """One detection mode; its state is whatever :meth:`fit` returns (kept in the calibration)."""

    # whether :meth:`fit` needs the labelled SOURCE split (normals + anomalies)
    needs_labelled: bool

    def extra_features(self, features_of: FeaturesOf, state: Any) -> list[NoiseFeatures]:
        """Noise features beyond the SG-hint pass that :meth:`score` needs (same images)."""
        ...

    def fit(self, source: ModeSource, calib: Calibration, cfg: DetectionConfig) -> Any:
        """The mode's state, fitted on ``source`` given the shared statistics of ``calib``."""
        ...

    def score(
        self, features: NoiseFeatures, extra: list[NoiseFeatures], calib: Calibration
    ) -> tuple[Tensor, Tensor]:
        """Score ``(B,)`` and decision ``(B,)`` bool (True = anomalous); state = ``calib.state``."""
        ...

    def threshold(self, calib: Calibration) -> tuple[float, bool]:
        """``(value, is_probability)``: the decision is ``score > value``."""
        ...

    def to_tensors(self, state: Any) -> dict[str, Tensor]:
        """The state's tensors (saved in ``extra.safetensors``)."""
        ...

    def to_meta(self, state: Any) -> dict[str, Any]:
        """The state's scalars (saved in ``dzad.json``; JSON values, no NaN)."""
        ...

    def from_saved(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Any:
        """Inverse of :meth:`to_tensors` + :meth:`to_meta`; ValueError when a part is missing."""
        ...


def quantile(x: Tensor, q: float) -> float:
    """The ``q`` quantile of scores ``(B,)`` (float64, so that tau does not depend on dtype)."""
    return float(torch.quantile(x.double(), q))


def mean_std(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-column mean and std of ``(B,...)``; std floored so that standardising never divides
    by zero (unbiased unless B = 1)."""
    return x.mean(0), x.std(0, unbiased=x.shape[0] > 1).clamp_min(1e-12)
