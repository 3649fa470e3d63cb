"""The paper study offline: a local SD-1.5-layout diffusers folder (tiny-but-same-structure,
benchmarks/sd15.py), its text encoder for the empty-prompt context, and a training step."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.sd15 import write_sd15_folder
from dzad import config
from dzad.checkpoint import load_checkpoint
from dzad.errors import DZADInputError
from dzad.latents import build_encoder
from dzad.networks import build_network, count_parameters
from dzad.training import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return write_sd15_folder(tmp_path_factory.mktemp("sd15") / "stable-diffusion-v1-5")


def paper_local(folder: Path, size: int = 64) -> config.DZADConfig:
    """studies/paper.yaml with ``model.pretrained`` = ``folder``, shrunk to seconds on a CPU."""
    cfg = config.load(REPO / "studies" / "paper.yaml")
    assert cfg.model.context == "empty_prompt" and cfg.model.profile == "paper"
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, image_size=size),
        model=dataclasses.replace(cfg.model, pretrained=str(folder)),
        train=dataclasses.replace(cfg.train, steps=2, batch_size=2, checkpoint_every=0,
                                  mixed_precision="no", device="cpu", num_workers=0),
        noise=dataclasses.replace(cfg.noise, n_stages=2, m_samples=1),
        reconstruction=dataclasses.replace(cfg.reconstruction, steps=2),
        detection=dataclasses.replace(cfg.detection, calibration_holdout=0.25,
                                      gating_bank_size=2, position_images=2),
        anomaly_map=dataclasses.replace(cfg.anomaly_map, random_backbone=True),
        evaluate=dataclasses.replace(cfg.evaluate, batch_size=4),
    )  # fmt: skip


def test_paper_network_loads_the_local_folder_with_its_empty_prompt(sd_folder):
    cfg = paper_local(sd_folder)
    enc = build_encoder(cfg.model, cfg.data.image_size)
    assert enc.latent_channels == 4 and enc.downsample == 8
    net = build_network(cfg.model, 4, 8, image_size=64)
    # the context is the text encoder's output for "", not zeros: (1, 77 tokens, UNet's width)
    assert net.context.shape == (1, 77, net.unet.config.cross_attention_dim)
    assert net.context.abs().sum() > 0
    # SG starts as a copy of the pretrained UNet's encoder, which is frozen (paper profile)
    torch.testing.assert_close(net.sg.conv_in.weight, net.unet.conv_in.weight)
    assert not any(p.requires_grad for p in net.unet.down_blocks.parameters())
    assert 0 < count_parameters(net, trainable_only=True) < count_parameters(net)
    zeros = build_network(dataclasses.replace(cfg.model, context="zeros"), 4, 8, image_size=64)
    assert zeros.context.shape == (1, 1, 32) and not zeros.context.any()


def test_empty_prompt_without_a_text_encoder_names_the_folder(sd_folder, tmp_path):
    partial = tmp_path / "sd"
    shutil.copytree(sd_folder / "unet", partial / "unet")
    cfg = dataclasses.replace(paper_local(partial).model)
    with pytest.raises(DZADInputError, match="text encoder"):
        build_network(cfg, 4, 8, image_size=64)


@pytest.mark.slow
def test_paper_profile_trains_offline_from_the_local_folder(sd_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = paper_local(sd_folder)
    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = train(cfg, images, tmp_path / "ckpt", progress=False)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    cfg_back, _, net, *_ = load_checkpoint(tmp_path / "ckpt")
    assert cfg_back.model.pretrained == str(sd_folder)
    # the frozen UNet encoder is the folder's; the checkpoint is self-contained (vae/ inside)
    from diffusers import UNet2DConditionModel

    src = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    torch.testing.assert_close(net.unet.down_blocks.state_dict(), src.down_blocks.state_dict())
    assert (tmp_path / "ckpt" / "vae").is_dir()


@pytest.mark.slow
def test_profiles_command_reads_the_paper_study_offline(sd_folder, tmp_path):
    params = tmp_path / "paper.yaml"
    params.write_text(yaml.safe_dump(config.to_dict(paper_local(sd_folder, size=256))))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dzad", "profiles", "--params", str(params)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["tiny", "demo"]
    assert all("latent 4x32x32" in line for line in lines)  # the VAE latent at 256 px
