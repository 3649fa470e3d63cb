"""The eq. 8 training loop and its seeded draws: data order, timesteps and noise.

No draw uses torch's global RNG: the data order and every (t, eps) draw come from generators seeded
by (seed, step), so a resumed run continues bit-for-bit and N processes train exactly what one
process trains. Only the weight initialisation needs a seeded global RNG (:func:`dzad.training.
seeded`), because torch and diffusers modules initialise their weights without a generator.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from dzad.config import DZADConfig
from dzad.data.source import ImageSource
from dzad.latents import Encoder
from dzad.networks import DZADNetwork
from dzad.progress import Progress
from dzad.training_state import Optimisation


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Global batch of ``step``: positions [step*B, (step+1)*B) of a stream of seeded epochs."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in pos.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        sel = pos // n == epoch
        out[sel] = perm[pos[sel] % n]
    return out


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's (t, eps) draws for the whole global batch: every process draws
    them all and takes its own rows, so N processes train exactly what one process trains."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 257)


def step_draws(
    seed: int, step: int, batch: int, latent: tuple[int, ...], t_max: int, rank: int, world: int
) -> tuple[Tensor, Tensor]:
    """This process's rows of step ``step``'s draws: t ``(B/world,)``, eps ``(B/world,*latent)``.

    Rows ``rank::world``, as the process's images (:class:`StepBatches`)."""
    gen = step_generator(seed, step)
    t = torch.randint(0, t_max, (batch,), generator=gen)
    eps = torch.randn((batch, *latent), generator=gen)
    return t[rank::world], eps[rank::world]


class StepBatches(Dataset):
    """Item ``step``: (indices ``(b,)``, images ``(b,3,H,W)``) of one process's share of that
    step's global batch; a DataLoader with ``train.num_workers`` decodes them ahead of the loop."""

    def __init__(
        self, source: ImageSource, train_idx: Tensor, batch: int, seed: int, rank: int, world: int
    ) -> None:
        self.source, self.train_idx, self.batch, self.seed = source, train_idx, batch, seed
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return 2**62  # indexed by step; the sampler says which steps

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor]:
        idx = self.train_idx[batch_indices(len(self.train_idx), self.batch, step, self.seed)]
        idx = idx[self.rank :: self.world]
        return idx, self.source.get(idx)


def step_loader(
    batches: StepBatches, start: int, steps: int, workers: int
) -> torch.utils.data.DataLoader:
    """Batches of steps ``start..steps-1`` in order, read by ``workers`` processes (0 = here).

    Its own generator (seeded like the data order) gives the workers' base seed, which a
    DataLoader would otherwise draw from the global RNG; the items themselves draw nothing."""
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        sampler=range(start, steps),
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        generator=torch.Generator().manual_seed(batches.seed),
    )


def enable_gradient_checkpointing(net: DZADNetwork) -> None:
    """UNet and SG recompute their block activations in the backward (``train.gradient_
    checkpointing``): far less activation memory for one more forward's time."""
    for part in (net.unet, net.sg):
        if part is not None:
            part.enable_gradient_checkpointing()


def notify(callbacks: Sequence[Any], event: str, *args: Any) -> None:
    """Call ``event`` (``on_step`` / ``on_checkpoint``) on each callback that has it; a plain
    callable is an ``on_step``."""
    for cb in callbacks:
        fn = getattr(cb, event, None)
        if fn is None and event == "on_step" and callable(cb):
            fn = cb
        if fn is not None:
            fn(*args)


@dataclass
class Loop:
    """What the steps need besides the optimisation: the prepared network ``net`` (wrapped by
    Accelerate), the encoder, the latents of every image when preloaded (else None) and the
    training schedule's ``alphas_cumprod`` ``(T,)``."""

    acc: Any  # accelerate.Accelerator
    net: nn.Module
    encoder: Encoder
    latents: Tensor | None
    alphas_cumprod: Tensor


def _step(loop: Loop, o: Optimisation, cfg: DZADConfig, step: int, idx, x) -> dict[str, float]:
    """One eq. 8 step on this process's images ``x`` ``(b,3,H,W)``; its metrics."""
    acc, tc, device = loop.acc, cfg.train, loop.acc.device
    t_step = time.perf_counter()
    x = x.to(device)
    with torch.no_grad():
        z0 = loop.latents[idx].to(device) if loop.latents is not None else loop.encoder.encode(x)
    t, eps = step_draws(
        cfg.seed, step, tc.batch_size, tuple(z0.shape[1:]), cfg.model.num_train_timesteps,
        acc.process_index, acc.num_processes,
    )  # fmt: skip
    t, eps = t.to(device), eps.to(device)
    ab = loop.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps  # eq. 7 with alpha-bar
    core: DZADNetwork = acc.unwrap_model(loop.net)
    with acc.autocast():
        pred = loop.net(z_t, t, core.hint(x, z0))
    loss = nn.functional.mse_loss(pred.float(), eps)  # eq. 8
    acc.backward(loss)
    clip = tc.grad_clip
    grad_norm = acc.clip_grad_norm_(loop.net.parameters(), clip) if clip else None
    lr = o.opt.param_groups[0]["lr"]  # the rate this step used
    o.opt.step()
    o.lr_sched.step()
    o.opt.zero_grad(set_to_none=True)
    if o.ema is not None:
        o.ema.update(o.params)
    return {
        "loss": float(acc.reduce(loss.detach(), reduction="mean")),
        "lr": lr,
        "images_per_s": tc.batch_size / (time.perf_counter() - t_step),
        "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
    }


def run_steps(
    loop: Loop,
    o: Optimisation,
    batches: StepBatches,
    cfg: DZADConfig,
    start: int,
    progress: bool,
    callbacks: Sequence[Any],
    snapshot: Callable[[int], Path],
) -> list[float]:
    """eq. 8 steps ``start..train.steps-1``; this run's losses (mean over processes).

    Every ``train.checkpoint_every`` steps (but the last) the main process writes ``snapshot``."""
    acc, tc = loop.acc, cfg.train
    losses: list[float] = []
    show = progress and acc.is_main_process
    loop.net.train()
    # workers decode streamed images; held in memory (a tensor) they would only copy slices
    workers = 0 if isinstance(batches.source.data, Tensor) else tc.num_workers
    with Progress(tc.steps, "train", "steps", enabled=show, initial=start) as bar:
        for step, (idx, x) in enumerate(step_loader(batches, start, tc.steps, workers), start):
            metrics = _step(loop, o, cfg, step, idx, x)
            done = step + 1
            losses.append(metrics["loss"])
            status = {
                "loss": f"{metrics['loss']:.4f}",
                "images/s": f"{metrics['images_per_s']:.1f}",
            }
            bar.advance(1, **status)
            if acc.is_main_process:
                notify(callbacks, "on_step", done, metrics)
            if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done < tc.steps:
                acc.wait_for_everyone()
                if acc.is_main_process:
                    notify(callbacks, "on_checkpoint", done, snapshot(done))
    return losses
