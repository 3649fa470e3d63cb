"""Image score (pooled max) and rank fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dzad.scoring import image_score, pool_size, rank_fusion, reference_rank


def _naive_pool_max(m: np.ndarray, k: int, rounds: int) -> float:
    """Independent loop implementation: replicate padding (k-1)//2 before, k//2 after."""
    out = m.astype(np.float64)
    lo, hi = (k - 1) // 2, k // 2
    for _ in range(rounds):
        padded = np.pad(out, ((lo, hi), (lo, hi)), mode="edge")
        new = np.empty_like(out)
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                new[i, j] = padded[i : i + k, j : j + k].mean()
        out = new
    return float(out.max())


def test_pooling_hand_example_region_beats_isolated_spike():
    spike = torch.zeros(1, 1, 5, 5)
    spike[0, 0, 2, 2] = 9.0
    block = torch.zeros(1, 1, 5, 5)
    block[0, 0, 1:3, 1:3] = 3.0
    # one round of 3x3 averaging: the spike gives 9/9 = 1, the 2x2 block 12/9 though its max is 3
    assert image_score(spike, k=3, rounds=1).item() == pytest.approx(1.0)
    assert image_score(block, k=3, rounds=1).item() == pytest.approx(4 / 3)
    # k = 1 is the plain maximum
    assert image_score(spike, k=1, rounds=8).item() == pytest.approx(9.0)


def test_pooling_matches_independent_loop_even_kernel():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 1, 9, 11)).astype(np.float32)
    got = image_score(torch.from_numpy(maps), k=4, rounds=3)
    want = [_naive_pool_max(maps[i, 0], 4, 3) for i in range(3)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


def test_pool_size_scales_with_resolution():
    assert pool_size(8, 256) == 8
    assert pool_size(8, 64) == 2
    assert pool_size(8, 16) == 1  # never below one pixel


def test_reference_rank_interpolates_and_never_saturates():
    ref = torch.tensor([0.0, 1.0, 2.0, 3.0])
    r = reference_rank(torch.tensor([1.0, 1.5, 3.0, 4.0, 10.0, -1.0]), ref)
    # reference points sit at (i + 0.5) / 4; beyond the ends the slope is 1 / range = 1/3
    expected = [0.375, 0.5, 0.875, 0.875 + 1 / 3, 0.875 + 7 / 3, 0.125 - 1 / 3]
    np.testing.assert_allclose(r.numpy(), expected, rtol=1e-9)


def test_rank_fusion_with_reference_is_batch_independent():
    ref_a = torch.linspace(0, 1, 50)
    ref_b = torch.linspace(10, 20, 50)
    a = torch.tensor([0.2, 0.9, 5.0])
    b = torch.tensor([19.0, 11.0, 30.0])
    fused = rank_fusion(a, b, ref_a, ref_b)
    single = rank_fusion(a[1:2], b[1:2], ref_a, ref_b)
    assert fused[1].item() == pytest.approx(single.item())
    assert fused[2] > fused[0] > fused[1]  # the image beyond every reference ranks highest
    # without references the batch is the reference: ranks are a permutation's mean
    self_ranked = rank_fusion(a, b)
    assert self_ranked.argmax().item() == 2
