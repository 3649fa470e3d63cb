"""Calibration on SOURCE features and the three detection modes (eq. 10-12, docs/method.md §7)."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from dzad.config import DetectionConfig, ModelConfig, NoiseConfig, WeightingConfig
from dzad.detection import (
    Calibration,
    build_prototypes,
    calibrate,
    detect,
    mode_features,
    self_score,
    weighted_map,
)
from dzad.detection_modes import ModeSource
from dzad.detection_modes.contrast import ContrastState
from dzad.detection_modes.prototype import PrototypeState, fit_temperature
from dzad.networks import build_network, make_scheduler
from dzad.noise_features import NoiseBank, NoiseFeatures, view_features
from dzad.weighting import weights_by_name

AB = make_scheduler(ModelConfig(num_train_timesteps=100)).alphas_cumprod
N, M = 5, 2


def _features(b: int, shift: float = 0.0, seed: int = 0) -> NoiseFeatures:
    """Consistent synthetic features: per-sample error maps ``(b,N,M,4,4)`` rising with n, plus
    ``shift`` on stages 1 and 3; F = their spatial mean, spatial = their mean over M."""
    g = torch.Generator().manual_seed(seed)
    level = 0.5 + 0.1 * torch.arange(N).view(1, N, 1, 1, 1)
    per_sample = level + 0.05 * torch.rand(b, N, M, 4, 4, generator=g)
    per_sample[:, [1, 3]] += shift
    return NoiseFeatures(F=per_sample.mean((3, 4)), spatial=per_sample.mean(2))


def test_calibration_statistics_threshold_and_gating_bank():
    normal = _features(100)
    det = DetectionConfig(threshold_quantile=0.9, gating_bank_size=16)
    calib = calibrate(normal, WeightingConfig(), det, AB, seed=3)
    m = normal.F.mean(2)
    assert torch.allclose(calib.stage_mean, m.mean(0)) and torch.allclose(calib.stage_std, m.std(0))
    assert torch.allclose(calib.weights, weights_by_name("dzad", 3.0, N, AB))
    scores = self_score(normal.F, calib)
    assert abs((scores > calib.tau).float().mean().item() - 0.1) <= 0.011
    assert calib.normal_spatial.shape == (16, 4, 4) and calib.normal_keys.shape == (16, N)
    again = calibrate(normal, WeightingConfig(), det, AB, seed=3)
    assert torch.equal(again.normal_spatial, calib.normal_spatial)  # seeded subsample
    # the weighted map's spatial mean is the image score (same weights and standardisation)
    maps = weighted_map(normal.spatial, calib)
    assert torch.allclose(maps.mean((1, 2)), self_score(normal.F, calib), atol=1e-4)


def test_self_mode_flags_images_with_larger_noise_error():
    calib = calibrate(_features(60), WeightingConfig(), DetectionConfig(), AB)
    test = NoiseFeatures.cat([_features(10, seed=5), _features(10, shift=0.2, seed=6)])
    score, decision = detect(test, calib)
    assert score.shape == (20,) and decision.dtype == torch.bool
    assert score[10:].min() > score[:10].max()
    assert decision[10:].all() and decision[:10].float().mean() < 0.5
    unstd = calibrate(_features(60), WeightingConfig(), DetectionConfig(standardise=False), AB)
    raw, _ = detect(test, unstd)
    assert torch.allclose(raw, test.F.mean(2) @ unstd.weights)


def test_contrast_mode_scores_the_hint_null_difference():
    normal, null = _features(40, seed=1), _features(40, shift=0.1, seed=2)
    det = DetectionConfig(mode="contrast")
    source = ModeSource(normal, normal_of=lambda **kw: null if kw == {"null_hint": True} else None)
    calib = calibrate(normal, WeightingConfig(name="uniform"), det, AB, source=source)
    state = calib.state
    assert calib.mode == "contrast" and isinstance(state, ContrastState)
    x, x_null = _features(6, seed=3), _features(6, seed=4)
    score, decision = detect(x, calib, [x_null])
    diff = (x.F.mean(2) - x_null.F.mean(2) - state.mean) / state.std
    assert torch.allclose(score, diff.sum(1), atol=1e-5)
    assert torch.equal(decision, score > state.tau)
    # tau: the threshold quantile of the SOURCE normals' own contrast scores
    own, _ = detect(normal, calib, [null])
    assert abs((own > state.tau).float().mean().item() - 0.05) <= 0.026
    with pytest.raises(ValueError, match="null-hint features"):
        detect(x, calib)
    with pytest.raises(ValueError, match="null-hint pass"):
        calibrate(normal, WeightingConfig(), det, AB)


def test_prototype_mode_softmax_argmin_and_fitted_temperature():
    normal = _features(30)
    labels = torch.tensor([0] * 20 + [1] * 20)
    # errors under the (normal, anomalous) prototypes: anomalies are better explained by k=1
    e_normal_proto = NoiseFeatures.cat([_features(20, seed=1), _features(20, shift=0.3, seed=2)])
    e_anom_proto = NoiseFeatures.cat([_features(20, shift=0.3, seed=3), _features(20, seed=4)])
    protos = [([torch.zeros(2, 1)], torch.zeros(2, 1)), ([torch.ones(2, 1)], torch.ones(2, 1))]
    det = DetectionConfig(mode="prototype")
    by_residuals = {0.0: e_normal_proto, 1.0: e_anom_proto}  # each condition's labelled features
    source = ModeSource(
        normal,
        labels=labels,
        labelled_of=lambda null_hint, residuals: by_residuals[float(residuals[1].mean())],
        prototypes_of=lambda: protos,
    )
    calib = calibrate(normal, WeightingConfig(), det, AB, labels=labels, source=source)
    assert calib.state.temperature > 0 and calib.state.prototypes is protos
    prob, decision = detect(e_normal_proto, calib, [e_normal_proto, e_anom_proto])
    assert ((prob >= 0) & (prob <= 1)).all()
    assert torch.equal(decision, labels.bool())  # argmin picks the better-explaining prototype
    assert torch.equal(decision, prob > 0.5)
    # T is applied: P(anomalous) = softmax(-e / T)[1] (checked at a T far from 1 and unsaturated)
    e = torch.stack(
        [self_score(f.F, calib) - calib.bias for f in (e_normal_proto, e_anom_proto)], 1
    )
    for t in (float(e.abs().mean()) * 3, float(e.abs().mean()) * 30):
        calib.state.temperature = t
        prob, _ = detect(e_normal_proto, calib, [e_normal_proto, e_anom_proto])
        assert torch.allclose(prob, torch.softmax(-e / t, 1)[:, 1], atol=1e-6)
        assert 0.01 < float((prob - 0.5).abs().max()) < 0.49
    with pytest.raises(ValueError, match="one NoiseFeatures per prototype"):
        detect(e_normal_proto, calib)
    with pytest.raises(ValueError, match="labelled SOURCE split"):
        calibrate(normal, WeightingConfig(), det, AB)


def test_fit_temperature_minimises_nll():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(200, generator=g) < 0.5).long()
    d = 0.3 * (2 * y - 1) + 0.3 * torch.randn(200, generator=g)

    def nll(t: float) -> float:
        return float(torch.nn.functional.binary_cross_entropy_with_logits(d / t, y.float()))

    t = fit_temperature(d, y)
    assert nll(t) <= min(nll(t * 1.5), nll(t / 1.5))


def test_learned_weighting_is_fitted_on_the_labelled_source_split():
    normal = _features(40)
    labelled = NoiseFeatures.cat([_features(30, seed=1), _features(30, shift=0.2, seed=2)])
    labels = torch.tensor([0] * 30 + [1] * 30)
    calib = calibrate(
        normal,
        WeightingConfig(name="learned"),
        DetectionConfig(),
        AB,
        features_labelled=labelled,
        labels=labels,
    )
    assert calib.weights[[1, 3]].min() > calib.weights[[0, 2, 4]].abs().max()  # shifted stages
    score, _ = detect(labelled, calib)
    assert score[30:].mean() > score[:30].mean()
    with pytest.raises(ValueError, match="labelled SOURCE"):
        calibrate(normal, WeightingConfig(name="learned"), DetectionConfig(), AB)


def test_calibration_tensor_round_trip():
    normal, null = _features(20), _features(20, seed=9)
    protos = [([torch.rand(4, 2, 3, 3), torch.rand(4, 5)], torch.rand(4, 6)) for _ in range(2)]
    source = ModeSource(normal, normal_of=lambda **kw: null, prototypes_of=lambda: protos)
    for mode in ("self", "contrast", "prototype"):
        det = DetectionConfig(mode=mode, fit_temperature=False, temperature=0.7)
        calib = calibrate(normal, WeightingConfig(), det, AB, source=source)
        calib.ref_map, calib.ref_detection = torch.rand(7), torch.rand(7)  # fusion references
        calib.ref_settings = {"reconstruction": {"t_start": 999}, "anomaly_map": {"sigma": 4.0}}
        tensors, meta = calib.to_tensors(), json.loads(json.dumps(calib.to_meta()))
        back = Calibration.from_tensors(tensors, meta)
        assert {"ref_map", "ref_detection"} <= set(tensors) and back.mode == mode
        for k, v in tensors.items():
            assert torch.equal(back.to_tensors()[k], v), k
        assert back.to_meta() == calib.to_meta() and back.ref_settings == calib.ref_settings
        assert (back.state is None) == (mode == "self")
    assert back.state.temperature == 0.7 and len(back.state.prototypes) == 2
    assert sum(k.startswith("mode.") for k in tensors) == 6  # 2 x (2 down skips + middle)
    plain = calibrate(normal, WeightingConfig(), DetectionConfig(), AB)
    assert Calibration.from_tensors(plain.to_tensors(), plain.to_meta()).ref_map is None
    with pytest.raises(ValueError, match="unknown detection mode 'gone'"):
        Calibration.from_tensors(plain.to_tensors(), {**plain.to_meta(), "mode": "gone"})
    no_mode = {k: v for k, v in plain.to_meta().items() if k != "mode"}
    with pytest.raises(ValueError, match="no detection mode"):
        Calibration.from_tensors(plain.to_tensors(), no_mode)


def test_prototypes_and_mode_features_on_a_network():
    model = ModelConfig(profile="tiny", latent="pixel", num_train_timesteps=100)
    torch.manual_seed(0)
    net = build_network(model, 3, 8).eval()
    with torch.no_grad():
        for p in net.sg.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bank = NoiseBank.create(NoiseConfig(n_stages=N, m_samples=M), 100, (3, 8, 8))
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 0, 1])
    protos = build_prototypes(net, [(2 * x - 1, x, labels)], bank, AB, 16)
    assert len(protos) == 2 and protos[0][1].shape[0] == N * M
    assert not torch.allclose(protos[0][1], protos[1][1])
    with pytest.raises(ValueError, match="0 anomalous"):
        build_prototypes(net, [(2 * x - 1, x, torch.zeros(4))], bank, AB, 16)
    calib = calibrate(
        NoiseFeatures(torch.rand(3, N, M), torch.rand(3, N, 8, 8)),
        WeightingConfig(),
        DetectionConfig(),
        AB,
    )
    features_of = partial(view_features, net, [("identity", x, 2 * x - 1)], bank, AB, 16)
    calib.mode, calib.state = "prototype", PrototypeState(protos)
    feats, extra = mode_features(features_of, calib)
    assert feats.F.shape == (4, N, M) and len(extra) == 2
    assert torch.equal(extra[1].F, features_of(null_hint=True, residuals=protos[1]).F)
    calib.mode, calib.state = "contrast", None
    _, extra = mode_features(features_of, calib)
    assert len(extra) == 1 and not torch.allclose(extra[0].F, feats.F)
    calib.mode = "self"
    assert mode_features(features_of, calib)[1] == []
