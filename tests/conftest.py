"""Shared fixtures: no telemetry, one tiny synthetic dataset and one `tiny` checkpoint per session.

The checkpoint is trained once (seconds on 2 cores) and reused read-only by every test file; a test
that needs to modify one copies it first. Torch runs single-threaded: the tiny models gain nothing
from more threads, and several test processes often share the machine's two cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dzad.config import ModelConfig
from flows import TELEMETRY_OFF, telemetry_off

os.environ.update(TELEMETRY_OFF)  # also before collection, for modules reading them on import
telemetry_off()  # and MLflow's progress bars, as the entry points do
torch.set_num_threads(1)

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
TINY_SIZE = 32
PIXEL_MODEL = ModelConfig(profile="tiny", latent="pixel", num_train_timesteps=100)  # `net` fixture


@pytest.fixture(scope="session", autouse=True)
def no_telemetry():
    """Every test runs with telemetry off (restored afterwards)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in TELEMETRY_OFF.items():
            mp.setenv(key, value)
        yield


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets`` (real MVTec-layout sets); the test is skipped when it is absent."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"{SHARED_DATASETS} not present")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Synthetic ``textures`` family (weave, grain, mesh) at 32 px in MVTec layout; read-only."""
    from dzad.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(
        root,
        seed=0,
        size=TINY_SIZE,
        n_train=24,
        n_test_good=4,
        n_test_defect=6,
        families=("textures",),
    )
    return root / "textures"


@pytest.fixture(scope="session")
def tiny_config():
    """The `tiny` profile at 32 px: pixel-unshuffle latent 12x16x16, 4 noise stages, 30 steps."""
    from dzad.config import (
        DataConfig,
        DetectionConfig,
        DZADConfig,
        EvalConfig,
        ModelConfig,
        NoiseConfig,
        TrainConfig,
    )

    return DZADConfig(
        data=DataConfig(image_size=TINY_SIZE),
        model=ModelConfig(profile="tiny", latent="pixel_unshuffle", unshuffle_factor=2),
        train=TrainConfig(steps=30, batch_size=8, warmup_steps=5, checkpoint_every=0, device="cpu"),
        noise=NoiseConfig(n_stages=4, m_samples=1, max_batch=64),
        detection=DetectionConfig(calibration_holdout=0.25, gating_bank_size=8),
        evaluate=EvalConfig(batch_size=8, knn_bank_size=256),
    )


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, synth_root, tiny_config) -> Path:
    """A calibrated `tiny` checkpoint trained on ``weave`` train/good (never modify it)."""
    from dzad.data.dataset import ImageDataset, iter_samples
    from dzad.training import train

    samples = list(iter_samples(synth_root, "weave", "train"))
    ds = ImageDataset(samples, TINY_SIZE, tiny_config.data)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    train(tiny_config, images, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint loaded as a :class:`dzad.model.DZAD` with a random backbone."""
    from dzad.model import DZAD

    return DZAD.from_checkpoint(tiny_checkpoint, random_backbone=True)


@pytest.fixture(scope="module")
def net():
    """A `tiny` pixel-latent network on 8x8 images whose SG is "trained" (non-zero residuals, so
    the hint matters); schedule of 100 timesteps (``alphas``)."""
    from dzad.networks import build_network

    torch.manual_seed(0)
    n = build_network(PIXEL_MODEL, 3, 8).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*n.sg.parameters(), *n.sff.parameters()]:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return n


@pytest.fixture(scope="module")
def alphas():
    from dzad.networks import make_scheduler

    return make_scheduler(PIXEL_MODEL).alphas_cumprod
