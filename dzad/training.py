"""eq. 8 training on SOURCE normals, then SOURCE-only calibration (docs/method.md §4 and §7).

The calibration (``dzad.calibration``) runs on SOURCE normals held out of the loop, with the
weights that will score (EMA when on), and is saved in the same checkpoint.

Loss: ``|| eps - eps_theta(sqrt(ab_t) z0 + sqrt(1-ab_t) eps, t, x0) ||^2``, t ~ U{0..T-1}. AdamW
with linear warm-up, gradient clipping, optional EMA, mixed precision where the device has it;
written on HF Accelerate so the same loop runs on CPU, one GPU or under ``accelerate launch``.
The steps are :mod:`dzad.training_loop`; what resume restores is :mod:`dzad.training_state`.

Reproducibility without hidden state: the data order and every (t, eps) draw are functions of (seed,
step, process), so ``resume`` continues bit-for-bit: the checkpoint written every
``checkpoint_every`` steps holds the raw and EMA weights, the optimizer and the LR schedule
(safetensors + JSON), and a killed run loses at most that many steps. The initial weights are a
function of ``seed`` too (:func:`seeded`); the caller's global RNG is left as it was.
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
from torch import Tensor
from torch.utils.data import Dataset

from dzad.calibration import calibrate_on_source, split_holdout
from dzad.checkpoint import load_checkpoint, save_checkpoint
from dzad.config import DZADConfig, flatten
from dzad.data.source import ImageSource
from dzad.detection import Calibration
from dzad.errors import CheckpointError
from dzad.io_utils import clean_stale
from dzad.latents import Encoder, build_encoder
from dzad.launch import check_processes
from dzad.model import map_backbone
from dzad.networks import DZADNetwork, build_network, make_scheduler
from dzad.noise_features import NoiseBank
from dzad.runtime import choose_device
from dzad.training_data import check_same_data
from dzad.training_loop import Loop, StepBatches, enable_gradient_checkpointing, notify, run_steps
from dzad.training_state import Optimisation, build_optimisation, restore, resume_state
from dzad.training_state import state_tensors as train_state_tensors


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


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Inside the block the global RNG (CPU, and ``device`` when it is a GPU) is seeded with
    ``seed``; after it the caller's RNG state is back.

    Only for weight initialisation: torch and diffusers modules initialise their weights from the
    global RNG and take no generator, so a scoped seed is how they become a function of ``seed``
    (the same weights as seeding the global RNG, without changing it for the caller)."""
    gpu = None
    if device.type == "cuda":
        gpu = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[] if gpu is None else [gpu]):
        torch.random.default_generator.manual_seed(seed)  # only the forked generators: the
        if gpu is not None:  # other GPUs' RNG stays the caller's
            torch.cuda.default_generators[gpu].manual_seed(seed)
        yield


def _accelerator(cfg: DZADConfig):
    from datetime import timedelta

    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs

    cpu = choose_device(cfg.train.device).type == "cpu"
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


@dataclass
class _Parts:
    """The frozen parts a run needs before its network: the encoder E (fitted on the training
    images, or the resumed checkpoint's), the map backbone Phi, the latent shape ``(C,h,w)`` and,
    when they fit in memory, the latents of every image ``(n,C,h,w)``."""

    encoder: Encoder
    backbone: Any
    latent_shape: tuple[int, int, int]
    latents: Tensor | None


def _parts(
    cfg: DZADConfig,
    source: ImageSource,
    train_idx: Tensor,
    previous: tuple[Any, ...] | None,
    device: torch.device,
) -> _Parts:
    encoder = build_encoder(cfg.model, source.image_size).to(device)
    if previous is not None:
        encoder.load_extra_state(previous[1].extra_state())
    else:
        encoder.fit(source.batches(train_idx, 32))
    backbone = map_backbone(cfg, encoder)  # before training: a missing Phi stops the run here
    shape = encoder.latent_shape(source.image_size)
    fits = math.prod(shape) * 4 * len(source) <= cfg.train.preload_max_mb * 2**20
    preload = isinstance(source.data, Tensor) and fits  # latents of every image, computed once
    latents = _encode_all(encoder, source, torch.arange(len(source)), device) if preload else None
    return _Parts(encoder, backbone, shape, latents)


def _snapshot(
    out_dir: Path, cfg: DZADConfig, parts: _Parts, core: DZADNetwork, bank: NoiseBank,
    o: Optimisation, data: dict[str, Any] | None,
) -> Callable[[int, Calibration | None], Path]:  # fmt: skip
    """Writes the checkpoint after ``step`` steps: the scoring weights (EMA when on), the raw ones
    and the optimisation in ``train_state/``; complete once a calibration is given."""

    def snapshot(step: int, calib: Calibration | None) -> Path:
        state = train_state_tensors(o, step)
        record = {"train": {"step": step, "complete": calib is not None}, "data": data}
        with o.scoring_weights():
            return save_checkpoint(
                out_dir, cfg, parts.encoder, core, bank, calib, record, train_state=state
            )

    return snapshot


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
    source = ImageSource(images, tc.preload_max_mb)
    d = cfg.detection
    holdout = (d.calibration_holdout, d.calibration_max_images)
    train_idx, cal_idx = split_holdout(len(source), *holdout, cfg.seed)
    clean_stale(out_dir)  # a killed save: its temp folder goes, a mid-swap .old comes back
    state = resume_state(out_dir) if resume else None
    previous = load_checkpoint(out_dir) if state is not None else None
    if previous is not None:
        _check_same_config(cfg, previous[0], out_dir)
        check_same_data(data, previous[5].get("data"), out_dir)
    with seeded(cfg.seed, device):  # random (test) encoders and backbones
        parts = _parts(cfg, source, train_idx, previous, device)
    with seeded(cfg.seed, device):  # the initial weights
        net = build_network(
            cfg.model, parts.latent_shape[0], parts.latent_shape[1], image_size=source.image_size
        ).to(device)
    alphas_cumprod = make_scheduler(cfg.model).alphas_cumprod.to(device)
    bank = NoiseBank.create(cfg.noise, cfg.model.num_train_timesteps, parts.latent_shape)
    o = build_optimisation(net, tc)
    start = 0
    if state is not None and previous is not None:
        net.load_state_dict(previous[2].state_dict())
        start = restore(o, state, device)
    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(net)
    net, o.opt = acc.prepare(net, o.opt)
    core: DZADNetwork = acc.unwrap_model(net)
    snapshot = _snapshot(out_dir, cfg, parts, core, bank, o, data)

    t0 = time.perf_counter()
    loop = Loop(acc, net, parts.encoder, parts.latents, alphas_cumprod)
    rank, world = acc.process_index, acc.num_processes
    batches = StepBatches(source, train_idx, tc.batch_size, cfg.seed, rank, world)
    losses = run_steps(
        loop, o, batches, cfg, start, progress, callbacks, lambda step: snapshot(step, None)
    )
    seconds = time.perf_counter() - t0
    acc.wait_for_everyone()

    calib, path = _calibrate_and_save(cfg, acc, core, parts, bank, alphas_cumprod, o, source,
                                      cal_idx, labelled, snapshot, callbacks, out_dir)  # fmt: skip
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


def _calibrate_and_save(
    cfg, acc, core, parts: _Parts, bank, alphas_cumprod, o: Optimisation, source: ImageSource,
    cal_idx: Tensor, labelled, snapshot, callbacks, out_dir: Path,
) -> tuple[Calibration, Path]:  # fmt: skip
    """Calibration on SOURCE data only, with the weights that will score (EMA when on), on the
    main process, which writes the final checkpoint; the others wait for its result."""
    lab = None
    if labelled is not None:
        images = ImageSource(labelled[0], cfg.train.preload_max_mb)
        lab = (images, torch.as_tensor(labelled[1]).long())
    calib = None
    path = out_dir
    if acc.is_main_process:
        with o.scoring_weights():
            calib = calibrate_on_source(
                cfg, core, parts.encoder, bank, alphas_cumprod, source, cal_idx, acc.device, lab,
                backbone=parts.backbone,
            )  # fmt: skip
        path = snapshot(cfg.train.steps, calib)
        notify(callbacks, "on_checkpoint", cfg.train.steps, path)
    return _from_main(calib), path


def _from_main(obj: Any) -> Any:
    """The main process's ``obj`` on every process (pickled over the process group)."""
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def with_steps(cfg: DZADConfig, steps: int) -> DZADConfig:
    """``cfg`` with ``train.steps`` replaced (CLI ``--steps``)."""
    return replace(cfg, train=replace(cfg.train, steps=steps))
