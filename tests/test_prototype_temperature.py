"""Prototype mode's probability is ``softmax(-e_k / T)`` with the configured or fitted T.

Expected values are computed here by hand from the features (per-stage z-scores with the SOURCE
normals' mean and std, eq. 13's weights), not read back from the calibration.
"""

from __future__ import annotations

import math

import pytest
import torch

from dzad.config import DetectionConfig, ModelConfig, WeightingConfig
from dzad.detection import calibrate, detect
from dzad.detection_modes.base import ModeSource
from dzad.detection_modes.prototype import fit_temperature
from dzad.networks import make_scheduler
from dzad.noise_features import NoiseFeatures
from dzad.weighting import weights_by_name

AB = make_scheduler(ModelConfig(num_train_timesteps=100)).alphas_cumprod
N, M = 5, 2
PROTOS = [([torch.zeros(2, 1)], torch.zeros(2, 1)), ([torch.ones(2, 1)], torch.ones(2, 1))]
LABELS = torch.tensor([0] * 20 + [1] * 20)


def _features(b: int, shift: float = 0.0, seed: int = 0) -> NoiseFeatures:
    """Errors ``(b,N,M)`` rising with n, noisy, plus ``shift`` on stages 1 and 3."""
    g = torch.Generator().manual_seed(seed)
    per_sample = 0.5 + 0.1 * torch.arange(N).view(1, N, 1, 1, 1)
    per_sample = per_sample + 0.05 * torch.rand(b, N, M, 4, 4, generator=g)
    per_sample[:, [1, 3]] += shift
    return NoiseFeatures(F=per_sample.mean((3, 4)), spatial=per_sample.mean(2))


NORMAL = _features(30)
# errors under the (normal, anomalous) prototype conditions; labelled SOURCE split (20 + 20):
# anomalies are better explained by k=1 but the classes overlap (a finite fitted T)
UNDER_NORMAL = NoiseFeatures.cat([_features(20, 0.0, 1), _features(20, 0.002, 2)])
UNDER_ANOMALOUS = NoiseFeatures.cat([_features(20, 0.002, 3), _features(20, 0.0, 4)])


def _errors(features: NoiseFeatures) -> torch.Tensor:
    """Weighted standardised error ``(B,)`` by hand (SOURCE-normal stats, dzad weights)."""
    m = NORMAL.F.mean(2)
    z = (features.F.mean(2) - m.mean(0)) / m.std(0)
    return z @ weights_by_name("dzad", 3.0, N, AB)


def _under(null_hint: bool, residuals) -> NoiseFeatures:
    """The labelled split's features under the prototype condition ``residuals``."""
    assert null_hint
    return UNDER_NORMAL if residuals is PROTOS[0] else UNDER_ANOMALOUS


def _calibrate(det: DetectionConfig):
    source = ModeSource(NORMAL, labels=LABELS, labelled_of=_under, prototypes_of=lambda: PROTOS)
    return calibrate(NORMAL, WeightingConfig(), det, AB, labels=LABELS, source=source)


@pytest.mark.parametrize("temperature", [0.25, 4.0])
def test_configured_temperature_scales_the_softmax(temperature):
    det = DetectionConfig(mode="prototype", fit_temperature=False, temperature=temperature)
    prob, decision = detect(UNDER_NORMAL, _calibrate(det), [UNDER_NORMAL, UNDER_ANOMALOUS])
    d = _errors(UNDER_NORMAL) - _errors(UNDER_ANOMALOUS)  # e_0 - e_1
    torch.testing.assert_close(prob, torch.sigmoid(d / temperature), atol=1e-5, rtol=1e-4)
    assert torch.equal(decision, d > 0)  # the better-explaining prototype, whatever T
    # T = 1 would give other probabilities: the check above sees whether T is applied
    assert (torch.sigmoid(d) - prob).abs().max() > 1e-2


def test_fitted_temperature_is_the_nll_minimiser_on_the_labelled_split():
    det = DetectionConfig(mode="prototype", fit_temperature=True, temperature=1.0)
    calib = _calibrate(det)
    d = _errors(UNDER_NORMAL) - _errors(UNDER_ANOMALOUS)
    t_fit = fit_temperature(d, LABELS)
    assert abs(math.log(t_fit)) > 0.5  # far from the configured 1.0, so the test can tell
    prob, _ = detect(UNDER_NORMAL, calib, [UNDER_NORMAL, UNDER_ANOMALOUS])
    torch.testing.assert_close(prob, torch.sigmoid(d / t_fit), atol=1e-5, rtol=1e-4)
