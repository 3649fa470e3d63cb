"""Eq. 15's reference bank: its keys are z-scored like the query keys, and the gate's spread is
the std of the bank's error maps (not 1: every map below has a spread other than 1).

Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch

from dzad.anomaly_map import gate_weights, nearest_reference
from dzad.config import DetectionConfig, MapConfig, ModelConfig, WeightingConfig
from dzad.detection import calibrate, weighted_map
from dzad.networks import make_scheduler
from dzad.noise_features import NoiseFeatures

AB = make_scheduler(ModelConfig(num_train_timesteps=100)).alphas_cumprod
SIZE = (4, 4)  # the maps' own size: bilinear upsampling is the identity


def _normals(b: int = 24, n: int = 5) -> NoiseFeatures:
    """Source-normal errors ``(b,n,2)`` / ``(b,n,4,4)`` whose stages differ in scale by 100x."""
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-2, 0, n).view(1, n, 1, 1, 1)
    per_sample = 1.0 + scale * torch.rand(b, n, 2, 4, 4, generator=g)
    return NoiseFeatures(F=per_sample.mean((3, 4)), spatial=per_sample.mean(2))


@pytest.mark.parametrize("standardise", [True, False])
def test_bank_keys_find_each_normal_itself(standardise):
    """Scoring looks a reference up with the image's stage means, z-scored when ``standardise``
    (as ``dzad.model`` does): with every normal in the bank, each one must find its own map."""
    normal = _normals()
    det = DetectionConfig(standardise=standardise, gating_bank_size=24)
    calib = calibrate(normal, WeightingConfig(), det, AB)
    m = normal.F.mean(2)
    query = (m - m.mean(0)) / m.std(0) if standardise else m
    found = nearest_reference(query, calib.normal_keys, calib.normal_spatial)
    torch.testing.assert_close(found, weighted_map(normal.spatial, calib))
    if standardise:  # the bank is all 24 normals: z-scored keys have mean 0 and std 1 per stage
        torch.testing.assert_close(calib.normal_keys.mean(0), torch.zeros(5), atol=1e-3, rtol=0)
        torch.testing.assert_close(calib.normal_keys.std(0), torch.ones(5), atol=1e-3, rtol=0)


def _bank(high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two reference maps, all 0 and all ``high`` (population std ``high / 2``), keys 0 and 10."""
    maps = torch.stack([torch.zeros(4, 4), torch.full((4, 4), high)])
    return torch.tensor([[0.0], [10.0]]), maps


def _error_with_peak(value: float) -> torch.Tensor:
    err = torch.zeros(1, 4, 4)
    err[0, 1, 2] = value
    return err


@pytest.mark.parametrize(("high", "spread"), [(4.0, 2.0), (1.0, 0.5), (0.0, 1.0)])
def test_spatial_gate_divides_the_excess_by_the_bank_spread(high, spread):
    """Nearest reference: the all-0 map (key 0). One position exceeds it by 3, so the gate there
    is exp(-3 / s), s = std of the bank's values (2, 0.5; 1 when the bank is constant), floored
    at w_pa_floor; 1 everywhere else."""
    keys, maps = _bank(high)
    cfg = MapConfig(gating="spatial", w_pa_floor=0.01)
    w = gate_weights(torch.tensor([True]), _error_with_peak(3.0), torch.zeros(1, 1), cfg, SIZE,
                     keys, maps)  # fmt: skip
    expected = torch.ones(1, 1, *SIZE)
    expected[0, 0, 1, 2] = max(math.exp(-3.0 / spread), 0.01)
    torch.testing.assert_close(w, expected)


def test_scalar_gate_uses_the_spread_too():
    """Scalar gating compares the map means: excess 3/16 over the all-0 reference, s = 2."""
    keys, maps = _bank(4.0)
    cfg = MapConfig(gating="scalar", w_pa_floor=0.01)
    w = gate_weights(torch.tensor([True]), _error_with_peak(3.0), torch.zeros(1, 1), cfg, SIZE,
                     keys, maps)  # fmt: skip
    torch.testing.assert_close(w, torch.full((1, 1, *SIZE), math.exp(-(3 / 16) / 2)))


def test_transductive_gate_takes_the_spread_of_the_batch_normals():
    """Batch: two detected-normal maps (all 0, all 4: s = 2) and one anomalous map exceeding the
    all-0 one (its nearest by key) by 3 at one position -> exp(-3/2) there."""
    err = torch.stack([torch.zeros(4, 4), torch.full((4, 4), 4.0), _error_with_peak(3.0)[0]])
    keys = torch.tensor([[0.0], [10.0], [1.0]])
    decision = torch.tensor([False, False, True])
    cfg = MapConfig(gating="transductive", w_pn=2.0, w_pa_floor=0.01)
    w = gate_weights(decision, err, keys, cfg, SIZE)
    expected = torch.ones(1, 1, *SIZE)
    expected[0, 0, 1, 2] = math.exp(-1.5)
    torch.testing.assert_close(w[2:], expected)
    torch.testing.assert_close(w[:2], torch.full((2, 1, *SIZE), 2.0))  # eq. 14: w_pn
