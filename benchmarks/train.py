"""Training speed: ``dzad.training.train`` steps (``demo`` study) against a bare forward+backward.

``python -m benchmarks.train [--steps 20] [--batch-size B] [--quick]`` prints one JSON line. The
library's ``train`` runs on synthetic SOURCE images (its Accelerate loop: batch gather, eq. 7
noising, forward, eq. 8 loss, backward, gradient clipping, AdamW, LR schedule, EMA); a step callback
timestamps every step and the median of the steady steps (the first ``--skip`` dropped) is the step
time. Then, in the same process, the network it trained (read back from its checkpoint) runs only
``loss = mse(net(z_t, t, x0), eps); loss.backward()`` at the same batch size. ``efficiency_ratio``
= step time / bare time (bar 1.2) on the wall clock, ``efficiency_ratio_cpu`` on this process's
CPU clock (not inflated by other jobs); ``images_per_s`` = batch size / step time.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from benchmarks._common import (
    Span,
    add_common_args,
    demo_config,
    emit,
    median_span,
    setup,
    stopwatch,
    synthetic_images,
    timed,
)


def bare_step(cfg, encoder, net, batch: int):
    """Forward+backward of ``net`` (the trained network, on ``encoder``'s latent) on one random
    batch (a callable)."""
    size = cfg.data.image_size
    channels, latent, _ = encoder.latent_shape(size)
    net.train()
    gen = torch.Generator().manual_seed(0)
    z_t = torch.randn((batch, channels, latent, latent), generator=gen)
    eps = torch.randn((batch, channels, latent, latent), generator=gen)
    t = torch.randint(0, cfg.model.num_train_timesteps, (batch,), generator=gen)
    x0 = torch.rand((batch, 3, size, size), generator=gen)

    def run() -> None:
        net.zero_grad(set_to_none=True)
        hint = net.hint(x0, z_t)  # a latent hint has z0's shape, so z_t stands in for it
        nn.functional.mse_loss(net(z_t, t, hint).float(), eps).backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out (warm-up)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the study's")
    parser.add_argument("--repeats", type=int, default=10)
    add_common_args(parser)
    args = parser.parse_args()
    setup(args)
    from dzad.checkpoint import load_checkpoint
    from dzad.training import train

    cfg = demo_config(quick=args.quick)
    steps, skip = (4, 1) if args.quick else (args.steps, args.skip)
    batch = 4 if args.quick else (args.batch_size or cfg.train.batch_size)
    cfg = replace(
        cfg,
        train=replace(cfg.train, steps=steps, batch_size=batch, checkpoint_every=0, device="cpu"),
    )
    stamps: list[Span] = []
    since_start = stopwatch()

    def stamp(step: int, metrics: dict) -> None:
        stamps.append(since_start())

    images = synthetic_images(max(2 * batch, 24), cfg.data.image_size, seed=cfg.seed)
    with tempfile.TemporaryDirectory(prefix="dzad-bench-") as tmp:
        train(cfg, images, Path(tmp) / "ckpt", callbacks=[stamp], progress=False)
        total = since_start()
        _, encoder, net, *_ = load_checkpoint(Path(tmp) / "ckpt")  # what train() just wrote
    pairs = zip(stamps[skip:], stamps[skip + 1 :], strict=False)
    step = median_span([Span(b.wall - a.wall, b.cpu - a.cpu) for a, b in pairs])
    bare = timed(bare_step(cfg, encoder, net, batch), args.repeats)
    emit(
        {
            "bench": "train",
            "batch_size": batch,
            "steps_timed": len(stamps) - skip - 1,
            "step_s": step.wall,
            "bare_forward_backward_s": bare.wall,
            "efficiency_ratio": step.wall / bare.wall,
            "efficiency_ratio_cpu": step.cpu / bare.cpu,
            "images_per_s": batch / step.wall,
            "images_per_s_cpu": batch / step.cpu,
            "bare_images_per_s": batch / bare.wall,
            "train_call_s": total.wall,
        }
    )


if __name__ == "__main__":
    main()
