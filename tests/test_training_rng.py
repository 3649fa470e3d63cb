"""Training draws from its own seeded generators: it neither reseeds nor reads the caller's RNG."""

from __future__ import annotations

from dataclasses import replace

import torch

from dzad.checkpoint import load_checkpoint
from dzad.config import NoiseConfig, TrainConfig
from dzad.networks import build_network
from dzad.training import seeded, train
from tests.test_training import CFG as TRAINING_CFG

# test_training's tiny pixel model, with fewer steps and noise draws (the RNG is what is checked)
CFG = replace(
    TRAINING_CFG,
    train=TrainConfig(steps=3, batch_size=4, warmup_steps=1, device="cpu"),
    noise=NoiseConfig(n_stages=2, m_samples=1, max_batch=32),
)
IMAGES = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder)[2].state_dict()


def test_training_leaves_the_callers_rng_as_it_was_and_does_not_depend_on_it(tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = train(CFG, IMAGES, tmp_path / "a", progress=False)
    assert torch.equal(torch.get_rng_state(), before)  # training, calibration, checkpoint
    torch.manual_seed(456)
    again = train(CFG, IMAGES, tmp_path / "b", progress=False)
    assert first.losses == again.losses
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.calibration.tau == again.calibration.tau


def test_seeded_initialisation_is_the_seeds_and_restores_the_rng():
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with seeded(CFG.seed, torch.device("cpu")):
        net = build_network(CFG.model, 3, 16, image_size=16)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(CFG.seed)  # the same weights as seeding the global RNG
    same = build_network(CFG.model, 3, 16, image_size=16)
    ref = same.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())
    with seeded(CFG.seed + 1, torch.device("cpu")):
        other = build_network(CFG.model, 3, 16, image_size=16)
    assert any(not torch.equal(v, ref[k]) for k, v in other.state_dict().items())
