"""Weight functions of eq. 13 / Table 4 and reweighting a stored F without rerunning the model."""

from __future__ import annotations

import math

import pytest
import torch

from dzad.config import ModelConfig, NoiseConfig, WeightingConfig
from dzad.networks import build_network, make_scheduler
from dzad.noise_features import NoiseBank, noise_features
from dzad.weighting import (
    fit_learned_weights,
    parse_name,
    rescore,
    stage_weights,
    weighted_score,
    weights_by_name,
)

AB = make_scheduler(ModelConfig()).alphas_cumprod.double()  # T = 1000, SD schedule
T = 1000


def _snr(t: int) -> float:
    return float(AB[t] / (1 - AB[t]))


def test_dzad_weights_match_formula():
    w = weights_by_name("dzad", 3.0, 10, AB)
    expect = [1 + math.exp(-3 * (10 - n)) for n in range(10)]
    assert torch.allclose(w.double(), torch.tensor(expect, dtype=torch.float64), rtol=1e-6)
    assert abs(w[9].item() - 1.0498) < 1e-4  # nearly uniform; noisiest bucket highest
    # N != 10: (N - n), so the noisiest bucket keeps 1 + exp(-k)
    w5 = weights_by_name("dzad", 3.0, 5, AB)
    assert torch.allclose(w5[-1], torch.tensor(1 + math.exp(-3)))


def test_dzad_k_names_parse_k():
    assert parse_name("dzad_k1", 3.0) == ("dzad", 1.0)
    assert parse_name("dzad_k0.5", 3.0) == ("dzad", 0.5)
    w1 = weights_by_name("dzad_k1", 3.0, 10, AB)
    assert torch.allclose(w1[9], torch.tensor(1 + math.exp(-1)))
    assert torch.equal(
        weights_by_name("dzad_k5", 0.0, 10, AB), weights_by_name("dzad", 5.0, 10, AB)
    )
    with pytest.raises(ValueError, match="unknown weighting"):
        parse_name("dzad_kx", 3.0)


def test_schedule_based_weights_match_formulas():
    centres = [(n + 0.5) * T / 10 for n in range(10)]
    idx = [math.floor(c) for c in centres]
    snr = weights_by_name("snr", 3.0, 10, AB)
    assert torch.allclose(
        snr.double(), torch.tensor([_snr(t) for t in idx], dtype=torch.float64), rtol=1e-5
    )
    prime = weights_by_name("snr_prime", 3.0, 10, AB)
    expect = [(_snr(t - 1) - _snr(t + 1)) / 2 for t in idx]
    assert torch.allclose(prime.double(), torch.tensor(expect, dtype=torch.float64), rtol=1e-5)
    assert (prime > 0).all()  # SNR falls with t
    for name, k in (("exp6", 6), ("exp7", 7)):
        w = weights_by_name(name, 3.0, 10, AB)
        expect = torch.tensor([math.exp(-k * c / T) for c in centres])
        assert torch.allclose(w, expect, rtol=1e-6)
    assert torch.equal(weights_by_name("uniform", 3.0, 10, AB), torch.ones(10))


def test_stage_weights_uses_config_and_refuses_learned():
    ts = torch.zeros(10, 2, dtype=torch.long)
    w = stage_weights(WeightingConfig(name="dzad", k=1.0), ts, AB)
    assert torch.equal(w, weights_by_name("dzad", 1.0, 10, AB))
    with pytest.raises(ValueError, match="calibration"):
        stage_weights(WeightingConfig(name="learned"), ts, AB)


def test_weighted_score_with_and_without_standardisation():
    F = torch.rand(4, 3, 2, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([1.0, 2.0, 3.0])
    m = F.mean(2)
    assert torch.allclose(weighted_score(F, w), (m * w).sum(1))
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([2.0, 4.0, 8.0])
    assert torch.allclose(weighted_score(F, w, mean, std), (((m - mean) / std) * w).sum(1))


def test_rescoring_a_stored_F_equals_recomputing_it():
    model = ModelConfig(profile="tiny", latent="pixel", num_train_timesteps=100)
    torch.manual_seed(0)
    net = build_network(model, 3, 8).eval()
    ab = make_scheduler(model).alphas_cumprod
    bank = NoiseBank.create(NoiseConfig(n_stages=5, m_samples=2), 100, (3, 8, 8))
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    stored = noise_features(net, 2 * x - 1, x, bank, ab, 64).F
    names = ["uniform", "snr", "snr_prime", "exp6", "exp7", "dzad_k1", "dzad_k5", "dzad", "learned"]
    mean, std = stored.mean((0, 2)), stored.mean(2).std(0)
    learned = (torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0]), 0.25)
    scores = rescore(stored, names, ab, mean=mean, std=std, learned=learned)
    assert set(scores) == set(names)
    for name in names:  # from scratch: a new model pass, then the weights of that name
        fresh = noise_features(net, 2 * x - 1, x, bank, ab, 64).F
        if name == "learned":
            expect = weighted_score(fresh, learned[0], mean, std) + learned[1]
        else:
            expect = weighted_score(fresh, weights_by_name(name, 3.0, 5, ab), mean, std)
        assert torch.allclose(scores[name], expect, rtol=1e-5, atol=1e-6), name
    assert not torch.allclose(scores["uniform"], scores["snr"])
    with pytest.raises(ValueError, match="learned"):
        rescore(stored, ["learned"], ab)


def test_learned_weights_pick_the_informative_stage():
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 40 + [1] * 40)
    x = torch.randn(80, 4, generator=g)
    x[:, 2] += 3 * y  # only stage 2 separates normals from anomalies
    w, bias = fit_learned_weights(x, y)
    assert w.shape == (4,) and int(w.argmax()) == 2 and w[2] > 3 * w[[0, 1, 3]].abs().max()
    assert isinstance(bias, float)
    with pytest.raises(ValueError, match="anomalies"):
        fit_learned_weights(x, torch.zeros(80))
