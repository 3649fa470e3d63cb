"""Base map, two-branch gating (eq. 14-15) and smoothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from dzad.anomaly_map import base_map, gate_weights, nearest_reference, smooth
from dzad.config import MapConfig

SIZE = (8, 8)


def _pair(cos_value: float, shape=(1, 2, 4, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """Two feature maps whose per-position cosine similarity is ``cos_value``."""
    a = torch.zeros(shape)
    a[:, 0] = 1.0
    b = torch.zeros(shape)
    b[:, 0] = cos_value
    b[:, 1] = float(np.sqrt(1 - cos_value**2))
    return a, b


def test_base_map_sums_levels_of_one_minus_cosine():
    a1, b1 = _pair(0.5)
    a2, b2 = _pair(0.0, shape=(1, 3, 2, 2))  # a coarser level, upsampled
    m = base_map([a1, a2], [b1, b2], SIZE)
    assert m.shape == (1, 1, *SIZE)
    torch.testing.assert_close(m, torch.full((1, 1, *SIZE), 0.5 + 1.0))
    same = base_map([a1], [a1.clone()], SIZE)
    assert same.abs().max().item() < 1e-6


def test_normal_branch_lowers_map_and_clamps_at_zero():
    a, b = _pair(0.5)
    cfg = MapConfig(gating="spatial", w_pn=1.5)
    err = torch.rand(1, 4, 4)
    keys = torch.rand(1, 3)
    w = gate_weights(torch.tensor([False]), err, keys, cfg, SIZE, keys, err)
    assert torch.all(w == 1.5)
    gated = base_map([a], [b], SIZE, w)
    torch.testing.assert_close(gated, torch.full((1, 1, *SIZE), 1 - 1.5 * 0.5))
    a9, b9 = _pair(0.9)
    assert base_map([a9], [b9], SIZE, w).min().item() == 0.0  # 1 - 1.35 clamped


def test_anomalous_branch_raises_map_where_error_exceeds_reference():
    cfg = MapConfig(gating="spatial", w_pa_floor=0.1)
    # reference bank: two SOURCE-normal error maps whose values have std exactly 1 (spread s)
    bank_maps = torch.stack([torch.zeros(4, 4), torch.full((4, 4), 2.0)])
    bank_keys = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    keys = torch.tensor([[0.5, 0.2]])  # nearest to bank image 0 (error 0 everywhere)
    err = torch.full((1, 4, 4), -0.5)  # standardised errors may be negative
    err[0, :2, :2] = 1.5  # hot quadrant: 1.5 above the reference
    w = gate_weights(torch.tensor([True]), err, keys, cfg, SIZE, bank_keys, bank_maps)
    assert w.max().item() <= 1.0 and w.min().item() >= 0.1
    assert w[0, 0, 0, 0].item() == pytest.approx(float(np.exp(-1.5)), rel=1e-5)
    assert w[0, 0, -1, -1].item() == pytest.approx(1.0)  # error below reference: no change
    a, b = _pair(0.8)
    plain, gated = base_map([a], [b], SIZE), base_map([a], [b], SIZE, w)
    assert gated[0, 0, 0, 0] > plain[0, 0, 0, 0] + 0.5
    assert gated[0, 0, -1, -1].item() == pytest.approx(plain[0, 0, -1, -1].item())
    floor = gate_weights(torch.tensor([True]), err + 50, keys, cfg, SIZE, bank_keys, bank_maps)
    assert floor.min().item() == pytest.approx(0.1)


def test_nearest_reference_picks_the_closest_key():
    bank_keys = torch.tensor([[0.0, 0.0], [5.0, 5.0], [9.0, 0.0]])
    bank_maps = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 2)
    ref = nearest_reference(torch.tensor([[4.0, 6.0], [8.0, 1.0]]), bank_keys, bank_maps)
    assert ref[:, 0, 0].tolist() == [1.0, 2.0]


def test_scalar_gate_is_one_number_per_image_spatial_is_not():
    err = torch.zeros(2, 4, 4)
    err[:, :2] = 2.0  # mean excess 1 over a reference of 0
    bank_keys = torch.zeros(2, 2)
    bank_maps = torch.stack([torch.zeros(4, 4), torch.full((4, 4), 2.0)])  # spread 1
    keys = torch.tensor([[0.0, 0.0], [0.1, 0.0]])
    decision = torch.tensor([True, True])
    spatial = gate_weights(
        decision, err, keys, MapConfig(gating="spatial"), SIZE, bank_keys, bank_maps
    )
    scalar = gate_weights(
        decision, err, keys, MapConfig(gating="scalar"), SIZE, bank_keys, bank_maps
    )
    assert spatial[0].unique().numel() > 1
    torch.testing.assert_close(scalar, torch.full_like(scalar, float(np.exp(-1.0))))


def test_transductive_gate_uses_batch_normals_and_none_is_identity():
    # the two detected-normal maps hold 0 and 2 (spread 1); the anomalous one 3
    err = torch.stack([torch.zeros(4, 4), torch.full((4, 4), 2.0), torch.full((4, 4), 3.0)])
    keys = torch.tensor([[0.0], [9.0], [1.0]])
    decision = torch.tensor([False, False, True])
    cfg = MapConfig(gating="transductive", w_pn=1.0, w_pa_floor=0.01)
    w = gate_weights(decision, err, keys, cfg, SIZE)  # no SOURCE bank needed
    torch.testing.assert_close(w[2], torch.full_like(w[2], float(np.exp(-3.0))))  # ref: image 0
    all_anomalous = gate_weights(torch.tensor([True, True, True]), err, keys, cfg, SIZE)
    assert torch.all(all_anomalous == 1.0)
    none = gate_weights(decision, err, keys, MapConfig(gating="none"), SIZE)
    assert torch.all(none == 1.0)
    with pytest.raises(ValueError, match="reference bank"):
        gate_weights(decision, err, keys, MapConfig(gating="spatial"), SIZE)


def test_l2_latent_distance_is_divided_by_the_gate():
    a = torch.zeros(2, 4, 4, 4)
    b = torch.full((2, 4, 4, 4), 2.0)
    w = torch.tensor([2.0, 0.5])
    m = base_map([a], [b], SIZE, w, distance="l2")
    assert m[0].unique().tolist() == [2.0] and m[1].unique().tolist() == [8.0]


def test_smooth_matches_scipy_gaussian_filter():
    rng = np.random.default_rng(1)
    m = rng.random((2, 1, 20, 24)).astype(np.float32)
    got = smooth(torch.from_numpy(m), sigma=1.5).numpy()
    want = np.stack([gaussian_filter(x[0], 1.5, mode="nearest", truncate=4.0) for x in m])
    np.testing.assert_allclose(got[:, 0], want, atol=1e-5)
    torch.testing.assert_close(smooth(torch.from_numpy(m), 0.0), torch.from_numpy(m))
