"""eq. 8 training on SOURCE normals, then SOURCE-only calibration (docs/method.md §4 and §7).

The calibration (``dzad.calibration``) runs on SOURCE normals held out of the loop, with the
weights that will score (EMA when on), and is saved in the same checkpoint.

Loss: ``|| eps - eps_theta(sqrt(ab_t) z0 + sqrt(1-ab_t) eps, t, x0) ||^2``, t ~ U{0..T-1}. AdamW
with linear warm-up, gradient clipping, optional EMA, mixed precision where the device has it;
written on HF Accelerate so the same loop runs on CPU, one GPU or under ``accelerate launch``.

Reproducibility without hidden state: the data order and every (t, eps) draw are functions of (seed,
step, process), so ``resume`` continues bit-for-bit: the checkpoint written every
``checkpoint_every`` steps holds the raw and EMA weights, the optimizer, the LR schedule and the
global RNG state (safetensors + JSON), and a killed run loses at most that many steps.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from dzad.calibration import ImageSource, calibrate_on_source, split_holdout
from dzad.checkpoint import (
    load_checkpoint,
    read_train_state,
    restore_rng_state,
    rng_state_tensors,
    save_checkpoint,
)
from dzad.config import DEVICES, DZADConfig, flatten
from dzad.detection import Calibration
from dzad.errors import CheckpointError
from dzad.io_utils import clean_stale
from dzad.latents import Encoder, build_encoder
from dzad.launch import check_processes
from dzad.model import map_backbone
from dzad.networks import DZADNetwork, build_network, make_scheduler
from dzad.noise_features import NoiseBank
from dzad.training_data import check_same_data


@dataclass
class TrainResult:
    """What a run did: the checkpoint folder, steps, per-step losses of this run, throughput."""

    checkpoint: Path
    steps: int
    resumed_from: int
    losses: list[float]
    seconds: float
    images_per_second: float
    calibration: Calibration


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
    """Batches of steps ``start..steps-1`` in order, read by ``workers`` processes (0 = here)."""
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        sampler=range(start, steps),
        num_workers=workers,
        prefetch_factor=2 if workers else None,
    )


def enable_gradient_checkpointing(net: DZADNetwork) -> None:
    """UNet and SG recompute their block activations in the backward (``train.gradient_
    checkpointing``): far less activation memory for one more forward's time."""
    for part in (net.unet, net.sg):
        if part is not None:
            part.enable_gradient_checkpointing()


class EMA:
    """Exponential moving average of the trainable weights, decay warmed up as (1+n)/(10+n).

    Not diffusers' ``EMAModel``: its first update copies the weights (decay 0) and its warm-up then
    runs one step behind this one, so trained weights, checkpoints and every result would change;
    the shadow weights here are also plain tensors in the checkpoint's training state (resume).
    """

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: p.detach().clone().float() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, nn.Parameter]) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - d)

    @contextlib.contextmanager
    def applied(self, params: dict[str, nn.Parameter]) -> Iterator[None]:
        """The EMA weights in ``params`` inside the block; the raw ones are restored after it."""
        raw = {k: p.detach().clone() for k, p in params.items()}
        _assign(params, self.shadow)
        try:
            yield
        finally:
            _assign(params, raw)


@torch.no_grad()
def _assign(params: dict[str, nn.Parameter], values: dict[str, Tensor]) -> None:
    for k, p in params.items():
        p.copy_(values[k])


def _scoring_weights(ema: EMA | None, params: dict[str, nn.Parameter]):
    """Context in which ``params`` hold the weights that score: the EMA ones when it is on."""
    return ema.applied(params) if ema is not None else contextlib.nullcontext()


def _trainable(net: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in net.named_parameters() if p.requires_grad}


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer state as safetensors tensors ``opt.<param>.<key>`` + JSON scalars."""
    sd = opt.state_dict()
    flat = {f"{i}.{k}": v for i, state in sd["state"].items() for k, v in state.items()}
    tensors = {f"opt.{k}": v.detach().cpu() for k, v in flat.items() if isinstance(v, Tensor)}
    scalars = {k: v for k, v in flat.items() if not isinstance(v, Tensor)}
    return tensors, {"param_groups": sd["param_groups"], "state_scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    flat = {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}
    state: dict[int, dict[str, Any]] = {}
    for key, v in {**flat, **meta["state_scalars"]}.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    groups = [
        {**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]
    ]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _accelerator(cfg: DZADConfig):
    from datetime import timedelta

    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs

    cpu = cfg.train.device == "cpu" or (
        cfg.train.device == "auto" and not torch.cuda.is_available()
    )
    if cfg.train.device not in DEVICES:
        raise ValueError(f"train.device must be auto, cpu or cuda, got {cfg.train.device!r}")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is cuda but no GPU is visible")
    if cpu and cfg.train.mixed_precision == "fp16":
        raise ValueError("train.mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
    check_processes(cfg.train)
    # only_mid_control leaves most SG output convs without gradient: DDP must allow that
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # the other processes wait while the main one calibrates and writes the checkpoint
    group = InitProcessGroupKwargs(timeout=timedelta(hours=2))
    # cpu=True on a machine without CUDA: launched processes then join one gloo group (with
    # cpu=False each would train alone)
    acc = Accelerator(
        cpu=cpu, mixed_precision=cfg.train.mixed_precision, kwargs_handlers=[ddp, group]
    )
    check_processes(cfg.train, acc.num_processes)
    return acc


def _encode_all(encoder: Encoder, source: ImageSource, idx: Tensor, device) -> Tensor:
    with torch.no_grad():
        return torch.cat([encoder.encode(x.to(device)).cpu() for x in source.batches(idx, 32)])


def _check_same_config(cfg: DZADConfig, old: DZADConfig, folder: Path) -> None:
    """Resume only the same run: every setting but ``train.steps`` must match the checkpoint's."""
    new, before = flatten(with_steps(cfg, 0)), flatten(with_steps(old, 0))
    diff = sorted(k for k in new.keys() | before.keys() if new.get(k) != before.get(k))
    if diff:
        raise CheckpointError(folder, f"cannot resume: the config differs in {diff}")


def _resume_state(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The training state to continue; an error when ``folder`` holds nothing to resume."""
    if not (folder / "dzad.json").exists():
        raise CheckpointError(folder, "nothing to resume: no checkpoint here (drop --resume)")
    state = read_train_state(folder)
    if state is None:
        raise CheckpointError(folder, "nothing to resume: the checkpoint has no train_state/")
    return state


def _notify(callbacks: Sequence[Any], event: str, *args: Any) -> None:
    for cb in callbacks:
        fn = getattr(cb, event, None)
        if fn is None and event == "on_step" and callable(cb):
            fn = cb
        if fn is not None:
            fn(*args)


def train(
    cfg: DZADConfig,
    images: Dataset | Tensor,
    out_dir: str | Path,
    resume: bool = False,
    callbacks: Sequence[Callable[..., Any] | Any] = (),
    *,
    labelled: tuple[Dataset | Tensor, Tensor] | None = None,
    progress: bool = True,
    data: dict[str, Any] | None = None,
) -> TrainResult:
    """Train on SOURCE normals ``images`` (``(n,3,H,W)`` in [0,1]), calibrate, write ``out_dir``.

    ``callbacks``: objects with ``on_step(step, metrics)`` and/or ``on_checkpoint(step, path)``
    (a plain callable is an ``on_step``). ``labelled`` = (images, labels 0/1) of a labelled SOURCE
    split, needed by the learned weighting and the prototype mode only. ``data``: the record of
    the training data (:func:`dzad.training_data.data_record`), saved in the checkpoint; ``resume``
    refuses other data and a folder with nothing to resume.
    """
    out_dir = Path(out_dir)
    tc = cfg.train
    acc = _accelerator(cfg)
    device = acc.device
    if cfg.reconstruction.t_start >= cfg.model.num_train_timesteps:  # calibration reconstructs
        raise ValueError("reconstruction.t_start must be < model.num_train_timesteps")
    torch.manual_seed(cfg.seed)
    source = ImageSource(images, tc.preload_max_mb)
    d = cfg.detection
    holdout = (d.calibration_holdout, d.calibration_max_images)
    train_idx, cal_idx = split_holdout(len(source), *holdout, cfg.seed)
    clean_stale(out_dir)  # a killed save: its temp folder goes, a mid-swap .old comes back
    state = _resume_state(out_dir) if resume else None
    previous = load_checkpoint(out_dir) if state is not None else None
    encoder = build_encoder(cfg.model, source.image_size).to(device)
    if previous is not None:
        _check_same_config(cfg, previous[0], out_dir)
        check_same_data(data, previous[5].get("data"), out_dir)
        encoder.load_extra_state(previous[1].extra_state())
    else:
        encoder.fit(source.batches(train_idx, 32))
    backbone = map_backbone(cfg, encoder)  # before training: a missing Phi stops the run here
    latent_shape = tuple(_encode_all(encoder, source, train_idx[:1], device).shape[1:])
    fits = math.prod(latent_shape) * 4 * len(source) <= tc.preload_max_mb * 2**20
    preload = isinstance(source.data, Tensor) and fits  # latents of every image, computed once
    latents = _encode_all(encoder, source, torch.arange(len(source)), device) if preload else None

    torch.manual_seed(cfg.seed)
    net = build_network(
        cfg.model, latent_shape[0], latent_shape[1], image_size=source.image_size
    ).to(device)
    alphas_cumprod = make_scheduler(cfg.model).alphas_cumprod.to(device)
    t_max = cfg.model.num_train_timesteps
    bank = NoiseBank.create(cfg.noise, t_max, latent_shape)  # type: ignore[arg-type]
    params = _trainable(net)
    opt = torch.optim.AdamW(params.values(), lr=tc.lr, weight_decay=tc.weight_decay)
    warm = max(1, tc.warmup_steps)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    ema = EMA(params, tc.ema_decay) if tc.ema else None

    start = 0
    if state is not None and previous is not None:
        tensors, meta = state
        net.load_state_dict(previous[2].state_dict())
        _assign(params, {k[4:]: v for k, v in tensors.items() if k.startswith("raw.")})
        _load_optimizer(opt, tensors, meta["optimizer"])
        lr_sched.load_state_dict(meta["lr_scheduler"])
        if ema is not None:
            ema.shadow = {k: tensors[f"ema.{k}"].to(device) for k in params}
            ema.updates = meta["ema_updates"]
        restore_rng_state(tensors)
        start = int(meta["step"])

    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(net)
    net, opt = acc.prepare(net, opt)
    core: DZADNetwork = acc.unwrap_model(net)

    def snapshot(step: int, calib: Calibration | None) -> Path:
        """Checkpoint with EMA weights as the scoring weights, raw ones in train_state/."""
        tensors = {f"raw.{k}": p.detach().cpu().clone() for k, p in params.items()}
        tensors.update(rng_state_tensors())
        opt_tensors, opt_meta = _optimizer_state(opt)
        tensors.update(opt_tensors)
        meta: dict[str, Any] = {
            "step": step,
            "optimizer": opt_meta,
            "lr_scheduler": lr_sched.state_dict(),
            "ema_updates": ema.updates if ema else 0,
        }
        if ema is not None:
            tensors.update({f"ema.{k}": v.cpu() for k, v in ema.shadow.items()})
        with _scoring_weights(ema, params):
            return save_checkpoint(
                out_dir,
                cfg,
                encoder,
                core,
                bank,
                calib,
                {"train": {"step": step, "complete": calib is not None}, "data": data},
                train_state=(tensors, meta),
            )

    t0 = time.perf_counter()
    losses = _run_steps(
        acc, net, opt, lr_sched, ema, params, encoder, latents, alphas_cumprod,
        StepBatches(source, train_idx, tc.batch_size, cfg.seed, acc.process_index,
                    acc.num_processes),
        cfg, start, progress, callbacks, snapshot,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    acc.wait_for_everyone()

    # calibration on SOURCE data only, with the weights that will score (EMA when on), on the
    # main process; the others wait for its result
    lab = None
    if labelled is not None:
        lab = (ImageSource(labelled[0], tc.preload_max_mb), torch.as_tensor(labelled[1]).long())
    calib = None
    path = out_dir
    if acc.is_main_process:
        with _scoring_weights(ema, params):
            calib = calibrate_on_source(
                cfg, core, encoder, bank, alphas_cumprod, source, cal_idx, device, lab,
                backbone=backbone,
            )  # fmt: skip
        path = snapshot(tc.steps, calib)
        _notify(callbacks, "on_checkpoint", tc.steps, path)
    calib = _from_main(calib)
    n_steps = tc.steps - start
    return TrainResult(
        checkpoint=path,
        steps=tc.steps,
        resumed_from=start,
        losses=losses,
        seconds=seconds,
        images_per_second=n_steps * tc.batch_size / seconds if seconds > 0 else 0.0,
        calibration=calib,
    )


def _from_main(obj: Any) -> Any:
    """The main process's ``obj`` on every process (pickled over the process group)."""
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _run_steps(
    acc, net, opt, lr_sched, ema, params, encoder, latents, alphas_cumprod,
    batches: StepBatches, cfg: DZADConfig, start: int, progress: bool, callbacks, snapshot,
) -> list[float]:  # fmt: skip
    """eq. 8 steps ``start..train.steps-1``; this run's losses (mean over processes)."""
    from tqdm.auto import tqdm

    tc, device = cfg.train, acc.device
    core: DZADNetwork = acc.unwrap_model(net)
    t_max = cfg.model.num_train_timesteps
    losses: list[float] = []
    bar = tqdm(
        total=tc.steps,
        initial=start,
        disable=not (progress and acc.is_main_process),
        desc="train",
        unit="step",
    )
    net.train()
    # workers decode streamed images; held in memory (a tensor) they would only copy slices
    workers = 0 if isinstance(batches.source.data, Tensor) else tc.num_workers
    loader = step_loader(batches, start, tc.steps, workers)
    for step, (idx, x) in enumerate(loader, start):
        t_step = time.perf_counter()
        x = x.to(device)
        with torch.no_grad():
            z0 = latents[idx].to(device) if latents is not None else encoder.encode(x)
        t, eps = step_draws(
            cfg.seed, step, tc.batch_size, tuple(z0.shape[1:]), t_max,
            acc.process_index, acc.num_processes,
        )  # fmt: skip
        t, eps = t.to(device), eps.to(device)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps  # eq. 7 with alpha-bar
        with acc.autocast():
            pred = net(z_t, t, core.hint(x, z0))
        loss = nn.functional.mse_loss(pred.float(), eps)  # eq. 8
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(net.parameters(), tc.grad_clip) if tc.grad_clip else None
        lr = opt.param_groups[0]["lr"]  # the rate this step used
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(params)
        done = step + 1
        loss_v = float(acc.reduce(loss.detach(), reduction="mean"))
        losses.append(loss_v)
        dt = time.perf_counter() - t_step
        metrics = {
            "loss": loss_v,
            "lr": lr,
            "images_per_s": tc.batch_size / dt,
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
        }
        bar.update(1)
        bar.set_postfix(loss=f"{loss_v:.4f}", img_s=f"{metrics['images_per_s']:.1f}")
        if acc.is_main_process:
            _notify(callbacks, "on_step", done, metrics)
        if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done < tc.steps:
            acc.wait_for_everyone()
            if acc.is_main_process:
                path = snapshot(done, None)
                _notify(callbacks, "on_checkpoint", done, path)
    bar.close()
    return losses


def with_steps(cfg: DZADConfig, steps: int) -> DZADConfig:
    """``cfg`` with ``train.steps`` replaced (CLI ``--steps``)."""
    return replace(cfg, train=replace(cfg.train, steps=steps))
