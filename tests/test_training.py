"""eq. 8 training loop: exact resume, frozen parts, EMA, callbacks; the checkpoint folder."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from dzad.calibration import split_holdout
from dzad.checkpoint import load_checkpoint, save_checkpoint
from dzad.config import (
    DetectionConfig,
    DZADConfig,
    ModelConfig,
    NoiseConfig,
    ReconstructionConfig,
    TrainConfig,
    WeightingConfig,
)
from dzad.errors import CheckpointError
from dzad.latents import build_encoder
from dzad.networks import build_network
from dzad.noise_features import NoiseBank
from dzad.training import train
from dzad.training_loop import batch_indices

CFG = DZADConfig(
    model=ModelConfig(profile="tiny", latent="pixel", num_train_timesteps=100),
    train=TrainConfig(steps=6, batch_size=4, checkpoint_every=3, warmup_steps=2, device="cpu"),
    noise=NoiseConfig(n_stages=4, m_samples=2, max_batch=32),
    detection=DetectionConfig(calibration_holdout=0.25),
    reconstruction=ReconstructionConfig(t_start=99),  # the schedule has 100 steps
)


def _images(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _weights(folder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_checkpoint(folder)[2].state_dict().items() if v.numel()}


class Recorder:
    def __init__(self, kill_at: int | None = None) -> None:
        self.steps, self.checkpoints, self.kill_at = [], [], kill_at

    def on_step(self, step: int, metrics: dict) -> None:
        self.steps.append((step, metrics))
        if step == self.kill_at:
            raise KeyboardInterrupt

    def on_checkpoint(self, step: int, path) -> None:
        self.checkpoints.append(step)


@pytest.mark.slow  # three trainings; resume on the same data stays fast in test_training_data
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    rec = Recorder()
    full = train(CFG, _images(), tmp_path / "a", callbacks=[rec], progress=False)
    assert [s for s, _ in rec.steps] == [1, 2, 3, 4, 5, 6] and rec.checkpoints == [3, 6]
    assert {"loss", "lr", "images_per_s", "grad_norm"} <= set(rec.steps[0][1])
    assert rec.steps[0][1]["lr"] == pytest.approx(CFG.train.lr / 2)  # warm-up
    killed = Recorder(kill_at=5)
    with pytest.raises(KeyboardInterrupt):
        train(CFG, _images(), tmp_path / "b", callbacks=[killed], progress=False)
    meta = json.loads((tmp_path / "b" / "dzad.json").read_text())
    assert meta["train"] == {"step": 3, "complete": False} and meta["calibration"] is None
    resumed = train(CFG, _images(), tmp_path / "b", resume=True, progress=False)
    assert resumed.resumed_from == 3 and len(resumed.losses) == 3
    assert resumed.losses == pytest.approx(full.losses[3:], abs=1e-6)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert resumed.calibration.tau == pytest.approx(full.calibration.tau, abs=1e-6)
    # the 3 held-out SOURCE normals' map and detection scores are stored as fusion references
    assert full.calibration.ref_map.shape == full.calibration.ref_detection.shape == (3,)
    torch.testing.assert_close(resumed.calibration.ref_map, full.calibration.ref_map)
    # a run that is resumed must be the same run
    other = dataclasses.replace(CFG, seed=1)
    with pytest.raises(CheckpointError, match="seed"):
        train(other, _images(), tmp_path / "b", resume=True, progress=False)
    # a config the calibration cannot reconstruct with stops before any training step
    bad = dataclasses.replace(CFG, reconstruction=ReconstructionConfig(t_start=100))
    with pytest.raises(ValueError, match="t_start"):
        train(bad, _images(), tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_frozen_unet_encoder_does_not_change_and_ema_weights_are_saved(tmp_path):
    cfg = dataclasses.replace(
        CFG,
        model=dataclasses.replace(CFG.model, freeze_unet_encoder=True),
        train=dataclasses.replace(CFG.train, lr=1e-2, ema=True, ema_decay=0.5),
    )
    train(cfg, _images(), tmp_path / "f", progress=False)
    torch.manual_seed(cfg.seed)
    init = build_network(cfg.model, 3, 16, image_size=16)
    after = load_checkpoint(tmp_path / "f")[2]
    for part in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        a, b = getattr(init.unet, part).state_dict(), getattr(after.unet, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    ups = init.unet.up_blocks.state_dict()
    assert any(not torch.equal(ups[k], v) for k, v in after.unet.up_blocks.state_dict().items())
    sg = init.sg.state_dict()
    assert any(not torch.equal(sg[k], v) for k, v in after.sg.state_dict().items())
    # scoring weights are the EMA; the raw ones are kept for resume
    state = load_file(str(tmp_path / "f" / "train_state" / "state.safetensors"))
    key = "unet.up_blocks.0.resnets.0.conv1.weight"
    got = after.state_dict()[key]
    assert torch.equal(got, state[f"s.ema.{key}"]) and not torch.equal(got, state[f"s.raw.{key}"])
    # the trained SG network is not ignored: the x0 hint and the null hint predict differently
    net = load_checkpoint(tmp_path / "f")[2]
    x = _images(2, seed=5)
    z, t = 2 * x - 1, torch.tensor([20, 80])
    with torch.no_grad():
        gap = (net.predict_noise(z, t, x) - net.predict_noise(z, t, None)).abs().max()
    assert gap > 1e-4


def test_data_order_is_seeded_epochs():
    first = torch.cat([batch_indices(10, 4, s, 0) for s in range(5)])  # 2 epochs of 10
    assert sorted(first[:10].tolist()) == list(range(10))
    assert sorted(first[10:].tolist()) == list(range(10))
    assert not torch.equal(first[:10], first[10:])
    assert torch.equal(batch_indices(10, 4, 3, 0), batch_indices(10, 4, 3, 0))
    train_idx, cal_idx = split_holdout(20, 0.25, 100, 0)
    assert len(cal_idx) == 5 and not set(train_idx.tolist()) & set(cal_idx.tolist())
    with pytest.raises(ValueError, match="too few"):
        split_holdout(4, 0.25, 100, 0)


def _trained_parts(seed: int = 0):
    cfg = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, latent="pixel_unshuffle"))
    torch.manual_seed(seed)
    enc = build_encoder(cfg.model, 16)
    net = build_network(cfg.model, 12, 8).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bank = NoiseBank.create(cfg.noise, 100, (12, 8, 8))
    return cfg, enc, net, bank


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    from dzad.detection import calibrate
    from dzad.noise_features import NoiseFeatures

    cfg, enc, net, bank = _trained_parts()
    feats = NoiseFeatures(torch.rand(6, 4, 2), torch.rand(6, 4, 8, 8))
    ab = torch.linspace(0.99, 0.01, 100)
    calib = calibrate(feats, WeightingConfig(), DetectionConfig(), ab)
    save_checkpoint(tmp_path / "ck", cfg, enc, net, bank, calib, {"train": {"step": 6}})
    assert {p.name for p in (tmp_path / "ck").iterdir()} == {
        "dzad.json",
        "unet",
        "sg",
        "extra.safetensors",
    }
    cfg2, enc2, net2, bank2, calib2, meta = load_checkpoint(tmp_path / "ck")
    assert cfg2 == cfg and meta["train"]["step"] == 6
    assert torch.equal(bank2.noise, bank.noise) and torch.equal(bank2.timesteps, bank.timesteps)
    assert calib2.to_meta() == calib.to_meta()
    assert torch.equal(calib2.normal_spatial, calib.normal_spatial)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    z = enc2.encode(x)
    t = torch.tensor([3, 90])
    with torch.no_grad():
        assert torch.equal(net2.predict_noise(z, t, x), net.predict_noise(z, t, x))
        assert torch.equal(net2.predict_noise(z, t, None), net.predict_noise(z, t, None))


def test_corrupt_or_wrong_checkpoints_raise_checkpoint_error(tmp_path):
    cfg, enc, net, bank = _trained_parts()
    ck = tmp_path / "ck"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(ck)
    ck.mkdir()
    with pytest.raises(CheckpointError, match=r"no dzad\.json"):
        load_checkpoint(ck)
    save_checkpoint(ck, cfg, enc, net, bank, None)
    meta = json.loads((ck / "dzad.json").read_text())
    (ck / "dzad.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(CheckpointError, match="version"):
        load_checkpoint(ck)
    (ck / "dzad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(ck)
    save_checkpoint(ck, cfg, enc, net, bank, None)
    extra = ck / "extra.safetensors"
    extra.write_bytes(extra.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ck)
    save_checkpoint(ck, cfg, enc, net, bank, None)
    (ck / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError):
        load_checkpoint(ck)
    save_checkpoint(ck, cfg, enc, net, bank, None)
    for f in (ck / "sg").iterdir():
        f.unlink()
    (ck / "sg").rmdir()
    with pytest.raises(CheckpointError, match="sg/"):
        load_checkpoint(ck)


def test_learned_weights_and_prototypes_calibrate_on_a_labelled_source_split(tmp_path):
    cfg = dataclasses.replace(
        CFG,
        train=dataclasses.replace(CFG.train, steps=2, checkpoint_every=0),
        weighting=WeightingConfig(name="learned"),
        detection=dataclasses.replace(CFG.detection, mode="prototype"),
    )
    with pytest.raises(ValueError, match="labelled SOURCE"):
        train(cfg, _images(), tmp_path / "x", progress=False)
    labelled = (_images(6, seed=1), torch.tensor([0, 1, 0, 1, 0, 1]))
    result = train(cfg, _images(), tmp_path / "p", labelled=labelled, progress=False)
    calib = result.calibration
    assert len(calib.state.prototypes) == 2 and calib.state.temperature > 0
    assert calib.weighting == "learned" and calib.weights.shape == (4,)
    loaded = load_checkpoint(tmp_path / "p")[4]
    assert torch.equal(loaded.state.prototypes[1][1], calib.state.prototypes[1][1])
    assert torch.equal(loaded.weights, calib.weights)


def test_training_reduces_the_noise_prediction_loss(tmp_path):
    cfg = dataclasses.replace(
        CFG,
        train=dataclasses.replace(
            CFG.train, steps=30, batch_size=8, lr=3e-3, warmup_steps=5, checkpoint_every=0
        ),
    )
    losses = train(cfg, _images(), tmp_path / "l", progress=False).losses
    assert sum(losses[:6]) / 6 > sum(losses[-6:]) / 6 + 0.1


def test_train_command_writes_a_loadable_checkpoint(tmp_path):
    pytest.importorskip("dzad.data.synth")
    from typer.testing import CliRunner

    from dzad.cli import app
    from dzad.data.synth import generate

    generate(
        tmp_path / "synth",
        size=32,
        n_train=8,
        n_test_good=2,
        n_test_defect=2,
        families=("objects",),
    )
    root = tmp_path / "synth" / "objects"
    cats = sorted(p.name for p in root.iterdir() if p.is_dir())[:2]
    params = tmp_path / "params.yaml"
    params.write_text(
        "data: {image_size: 32}\nmodel: {latent: pixel_unshuffle}\n"
        "train: {steps: 2, batch_size: 4, checkpoint_every: 0}\nnoise: {n_stages: 3}\n"
    )
    args = [
        "train",
        "--data",
        str(root),
        "--source-categories",
        ",".join(cats),
        "--profile",
        "tiny",
        "--params",
        str(params),
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ck")])
    assert result.exit_code == 0, result.output
    cfg, _, _, bank, calib, meta = load_checkpoint(tmp_path / "ck")
    assert cfg.model.profile == "tiny" and meta["train"] == {"step": 2, "complete": True}
    assert bank.noise.shape == (3, 1, 12, 16, 16) and calib is not None
    bad = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            str(root),
            "--source-categories",
            "nope",
            "--out",
            str(tmp_path / "ck2"),
        ],
    )
    assert bad.exit_code == 2 and "nope" in bad.output
    assert not (tmp_path / "ck2").exists()


@pytest.mark.parametrize("latent", ["vae", "backbone_features"])
def test_checkpoint_keeps_fitted_encoders(tmp_path, latent):
    if latent == "backbone_features":
        pytest.importorskip("dzad.backbones")
    model = ModelConfig(
        profile="tiny", latent=latent, random_vae=True, random_backbone=True, latent_channels=4
    )
    cfg = dataclasses.replace(CFG, model=model)
    torch.manual_seed(0)
    enc = build_encoder(model, 32)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    enc.fit([x])
    z = enc.encode(x)
    net = build_network(model, enc.latent_channels, z.shape[-1], image_size=32)
    bank = NoiseBank.create(cfg.noise, 100, tuple(z.shape[1:]))
    save_checkpoint(tmp_path / "ck", cfg, enc, net, bank, None)
    assert (tmp_path / "ck" / "vae").is_dir() == (latent == "vae")
    enc2 = load_checkpoint(tmp_path / "ck")[1]
    assert torch.allclose(enc2.encode(x), z, atol=1e-5)
    assert enc2.latent_range() == enc.latent_range() is not None
