"""GPU: the ``paper`` profile (random weights, 256 px): training steps and one scoring batch.

``python -m benchmarks.gpu [--train-batches 8 32] [--score-batch 8] [--steps 3] [--quick]`` prints
one JSON line; without a CUDA device it prints one ``error:`` line on stderr and exits with code 2
(nothing measured). The ``paper`` study's config (``studies/paper.yaml``) with random weights in
place of SD-1.5 (``pretrained`` None, ``random_vae``, zero text context, random ResNet50 for the
maps), UNet encoder and middle block frozen as at paper scale:

- training, for each batch in ``--train-batches`` and gradient checkpointing off / on (UNet and SG):
  VAE encoding (no grad), eq. 7 noising, forward under bf16 autocast, eq. 8 loss, backward, AdamW;
  ``train_b<B>_ckpt<0|1>`` = {``images_per_s``, ``peak_gb``} or {``oom``: true}. Bars: batch 8
  within 24 GB, batch 32 within 40 GB;
- scoring: the DZAD forward on ``--score-batch`` images with N=10, M=5 noise features and 10 DDIM
  steps, fp32 (the library's default) and under bf16 autocast: ``score_fp32`` / ``score_bf16`` =
  {``images_per_s``, ``peak_gb``}; bar 10 images/s on an H100/H200-class GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import torch
from torch import nn

from benchmarks._common import REPO, build_model, emit, synthetic_images

PAPER_STUDY = REPO / "studies" / "paper.yaml"


def paper_config(quick: bool = False):
    """The paper study with random weights; ``quick``: 2 noise stages, 2 DDIM steps."""
    from dzad.config import load

    cfg = load(PAPER_STUDY)
    model = replace(
        cfg.model, pretrained=None, random_vae=True, context="zeros", freeze_unet_encoder=True
    )
    cfg = replace(
        cfg,
        model=model,
        anomaly_map=replace(cfg.anomaly_map, random_backbone=True),
        noise=replace(cfg.noise, n_stages=10, m_samples=5),
        reconstruction=replace(cfg.reconstruction, steps=10),
    )
    if quick:
        cfg = replace(
            cfg,
            noise=replace(cfg.noise, n_stages=2, m_samples=1),
            reconstruction=replace(cfg.reconstruction, steps=2),
        )
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def training_parts(cfg, device: torch.device):
    """(frozen encoder, network) of ``cfg`` on ``device``: built once, reused by every setting."""
    from dzad.latents import build_encoder
    from dzad.networks import build_network

    size = cfg.data.image_size
    encoder = build_encoder(cfg.model, size).to(device).eval()
    latent = size // encoder.downsample
    torch.manual_seed(cfg.seed)
    net = build_network(cfg.model, encoder.latent_channels, latent, image_size=size).to(device)
    return encoder, net


def train_steps(cfg, encoder, net, batch: int, checkpointing: bool, steps: int) -> dict:
    """Images/s (median step after one warm-up) and peak memory of ``steps`` training steps."""
    from dzad.networks import make_scheduler

    device = next(net.parameters()).device
    for part in (net.unet, net.sg):
        if checkpointing:
            part.enable_gradient_checkpointing()
        else:
            part.disable_gradient_checkpointing()
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    alphas = make_scheduler(cfg.model).alphas_cumprod.to(device)
    size = cfg.data.image_size
    x = synthetic_images(batch, size).to(device)
    _reset_peak(device)
    times = []
    try:
        for _ in range(steps + 1):
            _sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                z0 = encoder.encode(x)
            t = torch.randint(0, cfg.model.num_train_timesteps, (batch,), device=device)
            eps = torch.randn_like(z0)
            ab = alphas[t].view(-1, 1, 1, 1)
            z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps  # eq. 7
            with torch.autocast(device.type, dtype=torch.bfloat16):
                pred = net(z_t, t, net.hint(x, z0))
            nn.functional.mse_loss(pred.float(), eps).backward()  # eq. 8
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        result = {"oom": True, "peak_gb": _peak_gb(device)}
    else:
        step = sorted(times[1:])[len(times[1:]) // 2]
        result = {"images_per_s": batch / step, "peak_gb": _peak_gb(device)}
    finally:
        net.zero_grad(set_to_none=True)
        del opt  # frees the AdamW state before the next setting
        _reset_peak(device)
    return result


def score_batch(model, batch: int, bf16: bool, repeats: int) -> dict[str, object]:
    """Images/s (median of ``repeats`` after one warm-up) and peak memory of the DZAD forward."""
    device = model.device
    x = synthetic_images(batch, model.image_size, seed=5).to(device)
    _reset_peak(device)
    times = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for _ in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            model(x)
            _sync(device)
            times.append(time.perf_counter() - start)
    step = sorted(times[1:])[len(times[1:]) // 2]
    return {"images_per_s": batch / step, "peak_gb": _peak_gb(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--score-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke test: a tiny workload")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "error: benchmarks.gpu needs a CUDA device and torch.cuda.is_available() is False; "
            "nothing was measured",
            file=sys.stderr,
        )
        raise SystemExit(2)
    cfg = paper_config(args.quick)
    device = torch.device("cuda")
    batches = [2] if args.quick else args.train_batches
    steps = 1 if args.quick else args.steps
    figures: dict[str, object] = {
        "bench": "gpu",
        "device": torch.cuda.get_device_name(),
        "image_size": cfg.data.image_size,
        "noise": [cfg.noise.n_stages, cfg.noise.m_samples],
        "ddim_steps": cfg.reconstruction.steps,
    }
    encoder, net = training_parts(cfg, device)
    figures["trainable_params"] = sum(p.numel() for p in net.parameters() if p.requires_grad)
    for b in batches:
        for ckpt in (False, True):
            figures[f"train_b{b}_ckpt{int(ckpt)}"] = train_steps(cfg, encoder, net, b, ckpt, steps)
    del encoder, net
    model = build_model(cfg, n_source=4, device=device)
    score_b = 2 if args.quick else args.score_batch
    figures["score_batch"] = score_b
    figures["score_fp32"] = score_batch(model, score_b, bf16=False, repeats=steps)
    figures["score_bf16"] = score_batch(model, score_b, bf16=True, repeats=steps)
    figures["images_per_s"] = figures["score_fp32"]["images_per_s"]  # type: ignore[index]
    emit(figures)


if __name__ == "__main__":
    main()
