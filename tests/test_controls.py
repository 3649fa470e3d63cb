"""dzad.controls on synthetic tensors: hand formulas, kNN bank behaviour, mutual scoring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dzad.controls as controls
from dzad.backbones import build_backbone
from dzad.config import EvalConfig
from dzad.controls import CONTROLS, build_control, greedy_coreset, nearest_distance

SIZE = 64


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_backbone("efficientnet_lite0", random_weights=True)


def textures(n: int, seed: int) -> torch.Tensor:
    """Smooth random colour textures ``(n, 3, SIZE, SIZE)`` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return F.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def with_blob(images: torch.Tensor) -> torch.Tensor:
    out = images.clone()
    out[:, :, 40:52, 12:24] = torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    return out


def test_registry_and_errors(backbone):
    assert set(CONTROLS) == {"mean_intensity", "laplacian", "feature_mean", "feature_knn", "mutual"}
    assert all(
        cls(EvalConfig(), backbone).label.startswith("control: ") for cls in CONTROLS.values()
    )
    with pytest.raises(ValueError, match="unknown control 'x'"):
        build_control("x", EvalConfig())
    with pytest.raises(ValueError, match="needs a backbone"):
        build_control("feature_knn", EvalConfig())
    with pytest.raises(ValueError, match="control_levels"):
        build_control("feature_knn", EvalConfig(control_levels=(3,)), backbone)


def test_mean_intensity_is_the_image_mean():
    x = torch.rand(3, 3, 16, 16)
    scores, maps = build_control("mean_intensity", EvalConfig()).score(x)
    torch.testing.assert_close(scores, x.mean((1, 2, 3)))
    assert maps is None


def test_laplacian_matches_hand_formula():
    x = torch.zeros(2, 3, 5, 5)
    x[0, :, 2, 2] = 1.0  # a bright centre pixel: |lap| = 4 there, 1 at its 4 neighbours
    x[1, 0, 2, 2] = 0.6  # only red: the grey value (channel mean) is 0.2
    scores, maps = build_control("laplacian", EvalConfig()).score(x)
    assert maps.shape == (2, 1, 5, 5)
    torch.testing.assert_close(scores, torch.tensor([8 / 25, 0.2 * 8 / 25]))
    assert maps[0, 0, 2, 2] == pytest.approx(4.0) and maps[0, 0, 1, 2] == pytest.approx(1.0)
    assert maps[0, 0, 0, 0] == 0.0
    # replicate borders: a constant image has zero Laplacian everywhere, edges included
    flat, _ = build_control("laplacian", EvalConfig()).score(torch.full((1, 3, 6, 6), 0.7))
    assert flat.item() == pytest.approx(0.0)


def test_knn_zero_in_bank_and_high_on_a_blob(backbone):
    cfg = EvalConfig(knn_bank_size=100_000, batch_size=4)
    knn = build_control("feature_knn", cfg, backbone)
    source = textures(6, seed=1)
    knn.fit([source[:3], source[3:]])
    grid = SIZE // backbone.strides[cfg.control_levels[0]]
    assert knn.bank.shape == (6 * grid * grid, sum(backbone.channels[i] for i in (1, 2)))
    scores, maps = knn.score(source)
    assert maps.shape == (6, 1, SIZE, SIZE)
    typical = knn.bank.norm(dim=1).mean()
    assert scores.max() < 1e-2 * typical  # every patch of a bank image is in the bank
    blob_scores, blob_maps = knn.score(with_blob(source))
    assert (blob_scores > 10 * scores.max()).all()
    inside = blob_maps[:, 0, 40:52, 12:24].mean((1, 2))
    outside = blob_maps[:, 0, :24, 40:].mean((1, 2))
    assert (inside > outside).all()


def test_knn_bank_subsample_is_seeded_and_sized(backbone):
    source = textures(4, seed=2)
    banks = []
    for seed in (0, 0, 1):
        cfg = EvalConfig(knn_bank_size=50, control_seed=seed)
        knn = build_control("feature_knn", cfg, backbone)
        knn.fit([source])
        banks.append(knn.bank)
    full = build_control("feature_knn", EvalConfig(knn_bank_size=10**6), backbone)
    full.fit([source])
    assert banks[0].shape[0] == 50
    torch.testing.assert_close(banks[0], banks[1])
    assert not torch.equal(banks[0], banks[2])
    assert (banks[0][:, None] == full.bank[None]).all(-1).any(1).all()  # rows of the full set


def test_greedy_coreset_covers_every_cluster():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    points = torch.cat([c + torch.randn(50, 2, generator=g) for c in centres])
    chosen = greedy_coreset(points, 3, torch.Generator().manual_seed(1))
    assert sorted((chosen // 50).tolist()) == [0, 1, 2]
    projected = greedy_coreset(torch.randn(200, 80, generator=g), 10, g, proj_dim=16)
    assert len(set(projected.tolist())) == 10


def test_nearest_distance_chunks_agree(monkeypatch):
    q, bank = torch.randn(300, 8), torch.randn(70, 8)
    expected = torch.cdist(q, bank).amin(1)
    monkeypatch.setattr(controls, "MAX_ELEMENTS", 100)  # many small chunks
    torch.testing.assert_close(nearest_distance(q, bank), expected)


def test_feature_mean_uses_source_statistics(backbone):
    cfg = EvalConfig(batch_size=2)
    ctrl = build_control("feature_mean", cfg, backbone)
    source, target = textures(5, seed=3), textures(2, seed=4)
    ctrl.fit([source])
    f_src, f_tgt = ctrl.features(source), ctrl.features(target)
    torch.testing.assert_close(ctrl.mean, f_src.mean(0))
    torch.testing.assert_close(ctrl.std, f_src.std(0).clamp_min(1e-6), rtol=1e-4, atol=1e-6)
    scores, maps = ctrl.score(target)
    dist = (((f_tgt - f_src.mean(0)) / f_src.std(0).clamp_min(1e-6)) ** 2).mean(1).sqrt()
    torch.testing.assert_close(scores, dist.flatten(1).amax(1), rtol=1e-4, atol=1e-5)
    assert maps.shape == (2, 1, SIZE, SIZE)
    blob_scores, _ = ctrl.score(with_blob(target))
    assert (blob_scores > scores).all()


def test_mutual_scoring_matches_brute_force_and_flags_the_odd_image(backbone):
    cfg = EvalConfig(mutual_fraction=0.5)
    ctrl = build_control("mutual", cfg, backbone)
    assert ctrl.transductive
    images = torch.cat([textures(1, seed=5).expand(3, -1, -1, -1), textures(2, seed=6)])
    images[4:] = with_blob(images[4:])
    scores, maps = ctrl.score(images)
    assert maps.shape == (5, 1, SIZE, SIZE)
    # brute force: per patch, nearest-patch distance to each other image, mean of the k smallest
    f = ctrl.features(images)
    b, c, h, w = f.shape
    k = math.ceil(0.5 * (b - 1))
    expected = torch.empty(b, h * w)
    for i in range(b):
        for p in range(h * w):
            q = f[i].reshape(c, -1)[:, p]
            per_image = [
                (f[j].reshape(c, -1) - q[:, None]).norm(dim=0).min() for j in range(b) if j != i
            ]
            expected[i, p] = torch.stack(per_image).sort().values[:k].mean()
    torch.testing.assert_close(scores, expected.amax(1), rtol=1e-3, atol=1e-3)
    assert scores[:3].max() < 1e-2 * scores[3:].min()  # duplicates find themselves elsewhere
    with pytest.raises(ValueError, match="at least 2"):
        ctrl.score(images[:1])


def test_maps_are_smoothed_when_asked(backbone):
    x = torch.rand(2, 3, 32, 32)
    _, raw = build_control("laplacian", EvalConfig()).score(x)
    _, smoothed = build_control("laplacian", EvalConfig(), smooth_sigma=2.0).score(x)
    assert smoothed.shape == raw.shape and smoothed.std() < raw.std()
