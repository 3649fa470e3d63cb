"""The paper-scale check for a fresh GPU machine: one JSON line per phase, printed as it ends.

``python -m benchmarks.gpu --check [--pretrained DIR]`` (scripts/gpu_check.sh installs what is
missing first; docs/gpu.md) runs, on the ``paper`` study (``studies/paper.yaml``; random weights in
place of SD-1.5 unless ``--pretrained`` names a local SD-1.5 folder; random ResNet50 for the maps):

- ``versions``: Python, torch, CUDA, the libraries, the device and its bf16 support;
- ``train_b<B>_ckpt<0|1>`` for B in 8, 32, gradient checkpointing off / on: VAE encoding, eq. 7
  noising, bf16 autocast forward, eq. 8 loss, backward, AdamW: ``images_per_s``, ``peak_gb`` or
  ``oom: true``;
- ``train_run``: the library's ``train()`` (Accelerate, bf16) for a few steps, a checkpoint, then a
  resumed run from it: seconds, checkpoint size, ``resumed_from``;
- ``score_fp32`` / ``score_bf16``: the DZAD forward (N=10, M=5, 10 DDIM steps) in each
  ``noise.precision``: ``images_per_s``, ``peak_gb``;
- ``e2e``: synthetic textures at 256 px through the study functions (prepare, preprocess, train a
  few hundred steps, calibrate, evaluate): ``metrics.json`` written, its image AUROC.

A phase that fails prints ``{"phase": ..., "error": ...}`` and the next one still runs; the exit
code is 1 when any failed. ``--cpu-dry-run`` runs every phase on the CPU on a shrunken config (a
tiny-but-SD-1.5-layout random folder as ``pretrained``, 64 px, a few steps): the test suite runs it.
Without ``--cpu-dry-run`` and without CUDA it prints one ``error:`` line and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks._common import REPO, build_model, synthetic_images, tidy, with_precision

PAPER_STUDY = REPO / "studies" / "paper.yaml"


def paper_config(pretrained: str | None = None):
    """The paper study; random weights (zero text context) unless ``pretrained`` is a folder."""
    from dzad.config import load

    cfg = load(PAPER_STUDY)
    if pretrained is None:
        model = replace(cfg.model, pretrained=None, random_vae=True, context="zeros")
    else:
        model = replace(cfg.model, pretrained=pretrained)
    return replace(
        cfg,
        model=replace(model, freeze_unet_encoder=True),
        anomaly_map=replace(cfg.anomaly_map, random_backbone=True),
        train=replace(cfg.train, device="auto"),
    )


def dry_config(pretrained: str):
    """:func:`paper_config` of a tiny SD-1.5-layout folder, shrunk to seconds on a CPU."""
    cfg = paper_config(pretrained)
    return replace(
        cfg,
        data=replace(cfg.data, image_size=64),
        train=replace(cfg.train, mixed_precision="no", num_workers=0),
        noise=replace(cfg.noise, n_stages=2, m_samples=1),
        reconstruction=replace(cfg.reconstruction, steps=2),
        detection=replace(cfg.detection, gating_bank_size=2),
        evaluate=replace(cfg.evaluate, batch_size=2, controls=False, figures=False),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def versions(device: torch.device) -> dict[str, Any]:
    """Python, libraries and the device."""
    import importlib.metadata as md

    libs = {}
    for name in ("diffusers", "accelerate", "transformers", "safetensors", "numpy", "torchvision"):
        try:
            libs[name] = md.version(name)
        except md.PackageNotFoundError:
            libs[name] = None
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **libs,
        "device": str(device),
        "commit": _commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(
            name=props.name,
            memory_gb=props.total_memory / 2**30,
            gpus=torch.cuda.device_count(),
            bf16=torch.cuda.is_bf16_supported(),
        )
    return out


def _commit() -> str | None:
    """The checkout's git commit, when it is a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def training_parts(cfg, device: torch.device):
    """(frozen encoder, network) of ``cfg`` on ``device``: built once, reused by every setting."""
    from dzad.latents import build_encoder
    from dzad.networks import build_network

    size = cfg.data.image_size
    # random weights: created and initialised on the device (faster); a folder loads as usual
    place = device if cfg.model.pretrained is None else contextlib.nullcontext()
    with place:
        encoder = build_encoder(cfg.model, size).to(device).eval()
        channels, latent, _ = encoder.latent_shape(size)
        torch.manual_seed(cfg.seed)
        net = build_network(cfg.model, channels, latent, image_size=size)
    return encoder, net.to(device)


def train_steps(cfg, encoder, net, batch: int, checkpointing: bool, steps: int) -> dict:
    """Images/s (median step after one warm-up) and peak memory of ``steps`` training steps."""
    from dzad.networks import make_scheduler
    from dzad.training_loop import enable_gradient_checkpointing

    device = next(net.parameters()).device
    if checkpointing:
        enable_gradient_checkpointing(net)
    else:
        for part in (net.unet, net.sg):
            part.disable_gradient_checkpointing()
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    alphas = make_scheduler(cfg.model).alphas_cumprod.to(device)
    x = synthetic_images(batch, cfg.data.image_size).to(device)
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
        result: dict[str, Any] = {"oom": True, "peak_gb": _peak_gb(device)}
    else:
        step = sorted(times[1:])[len(times[1:]) // 2]
        result = {"oom": False, "images_per_s": batch / step, "peak_gb": _peak_gb(device)}
    finally:
        net.zero_grad(set_to_none=True)
        del opt  # frees the AdamW state before the next setting
        _reset_peak(device)
    return {"batch": batch, "gradient_checkpointing": checkpointing, **result}


def train_run(cfg, out: Path, steps: int, batch: int) -> dict:
    """The library's ``train()``: ``steps`` steps -> checkpoint, then resumed to ``2*steps``."""
    from dzad.training import train, with_steps

    cuda = torch.cuda.is_available()
    tc = replace(cfg.train, batch_size=batch, checkpoint_every=0, mixed_precision="bf16" if cuda
                 else "no")  # fmt: skip
    det = replace(cfg.detection, calibration_holdout=0.25, position_images=4, gating_bank_size=2)
    cfg = replace(cfg, train=tc, detection=det)
    images = synthetic_images(max(8, 4 * batch), cfg.data.image_size, seed=3)
    start = time.perf_counter()
    first = train(with_steps(cfg, steps), images, out, progress=False)
    first_s = time.perf_counter() - start
    size_gb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**30
    start = time.perf_counter()
    second = train(with_steps(cfg, 2 * steps), images, out, resume=True, progress=False)
    losses = first.losses + second.losses
    return {
        "steps": 2 * steps,
        "batch": batch,
        "resumed_from": second.resumed_from,
        "first_run_s": first_s,
        "resumed_run_s": time.perf_counter() - start,
        "train_images_per_s": second.images_per_second,
        "checkpoint_gb": size_gb,
        "losses_finite": bool(torch.isfinite(torch.tensor(losses)).all()),
        "tau": second.calibration.tau,
    }


def score(model, precision: str, batch: int, repeats: int) -> dict[str, Any]:
    """Images/s (median of ``repeats`` after one warm-up) and peak memory of the DZAD forward in
    ``noise.precision`` ``precision`` (calibration: the model's own, as built)."""
    m = with_precision(model, precision)
    device = m.device
    x = synthetic_images(batch, m.image_size, seed=5).to(device)
    _reset_peak(device)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        m(x)
        _sync(device)
        times.append(time.perf_counter() - start)
    step = sorted(times[1:])[len(times[1:]) // 2]
    return {"batch": batch, "images_per_s": batch / step, "peak_gb": _peak_gb(device)}


def e2e(cfg, root: Path, size: int, steps: int) -> dict[str, Any]:
    """Synthetic weave -> grain at ``size`` px through the study functions; metrics.json."""
    import os

    from dzad.config import DatasetRef
    from dzad.study.data import prepare_data, preprocess_data
    from dzad.study.seed_evaluation import evaluate_seeds
    from dzad.study.seed_training import train_seeds

    textures = "data/raw/synth/textures"
    cfg = replace(
        cfg,
        seeds=(0,),
        data=replace(cfg.data, image_size=size),
        synth=replace(cfg.synth, dest="data/raw/synth", families=("textures",), size=size,
                      n_train=24, n_test_good=4, n_test_defect=4),
        sets=replace(cfg.sets, fetch=(), source=(DatasetRef(textures, ("weave",)),),
                     targets={"grain": DatasetRef(textures, ("grain",))}),
        train=replace(cfg.train, steps=steps, batch_size=min(cfg.train.batch_size, 8),
                      checkpoint_every=0, processes=1),
        detection=replace(cfg.detection, calibration_holdout=0.25, position_images=8),
    )  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    here = Path.cwd()
    os.chdir(root)  # the study layout is relative to the working directory
    try:
        seconds = {}
        for name, fn in (
            ("prepare", lambda: (prepare_data(cfg), preprocess_data(cfg))),
            ("train", lambda: train_seeds(cfg, "models")),
            ("evaluate", lambda: evaluate_seeds(cfg, "models", "grain", "runs/eval/grain")),
        ):
            start = time.perf_counter()
            fn()
            seconds[f"{name}_s"] = time.perf_counter() - start
        metrics = root / "runs/eval/grain/seed_0/metrics.json"
        result = json.loads(metrics.read_text())
    finally:
        os.chdir(here)
    return {"size": size, "steps": steps, **seconds, "metrics_json": str(metrics),
            "image_auroc": result["mean"]["image_auroc"]}  # fmt: skip


def phase(name: str, fn: Callable[[], dict[str, Any]], failed: list[str]) -> Any:
    """Run one phase and print its JSON line at once; a failure is a line too (and recorded)."""
    start = time.perf_counter()
    try:
        figures = fn()
    except Exception as exc:  # reported, then the next phase runs
        failed.append(name)
        last = traceback.extract_tb(exc.__traceback__)[-1]
        figures = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                   "at": f"{Path(last.filename).name}:{last.lineno}"}  # fmt: skip
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    line = {"phase": name, "seconds": time.perf_counter() - start, **figures}
    print(json.dumps(tidy(line), default=str), flush=True)
    return figures


def run_check(args: argparse.Namespace, work: Path) -> list[str]:
    """Every phase in order; the names of the failed ones."""
    failed: list[str] = []
    dry = args.cpu_dry_run
    device = torch.device("cpu" if dry else "cuda")
    if dry:
        from benchmarks.sd15 import write_sd15_folder

        cfg = dry_config(str(write_sd15_folder(work / "sd15")))
        batches, steps, score_b, run_steps, e2e_size, e2e_steps = (1, 2), 1, 2, 1, 64, 2
    else:
        cfg = paper_config(args.pretrained)
        batches, steps, score_b = (8, 32), args.steps, args.score_batch
        run_steps, e2e_size, e2e_steps = args.run_steps, 256, args.e2e_steps
    phase("versions", lambda: versions(device), failed)
    parts: dict[str, Any] = {}
    phase("build", lambda: _build(cfg, device, parts), failed)
    for b in batches:
        for ckpt in (False, True):
            phase(f"train_b{b}_ckpt{int(ckpt)}",
                  lambda b=b, ckpt=ckpt: train_steps(cfg, *parts["parts"], b, ckpt, steps),
                  failed)  # fmt: skip
    parts.clear()
    gc.collect()  # the network and its gradients go before train_run builds its own
    _reset_peak(device)
    phase("train_run", lambda: train_run(cfg, work / "train_run", run_steps, batches[0]), failed)
    model: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        phase(f"score_{precision}", lambda p=precision: score(_model(cfg, device, model), p,
                                                              score_b, steps), failed)  # fmt: skip
    model.clear()
    phase("e2e", lambda: e2e(cfg, work / "e2e", e2e_size, e2e_steps), failed)
    return failed


def _build(cfg, device: torch.device, parts: dict[str, Any]) -> dict[str, Any]:
    parts["parts"] = training_parts(cfg, device)
    net = parts["parts"][1]
    return {
        "params": sum(p.numel() for p in net.parameters()),
        "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "pretrained": cfg.model.pretrained,
        "context": cfg.model.context,
    }


def _model(cfg, device: torch.device, cache: dict[str, Any]):
    """One calibrated model (random weights) shared by both scoring phases."""
    if "model" not in cache:
        cache["model"] = build_model(cfg, n_source=4, device=device)
    return cache["model"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="every phase on the GPU")
    mode.add_argument("--cpu-dry-run", action="store_true", help="every phase, shrunken, on CPU")
    parser.add_argument("--pretrained", help="local SD-1.5 diffusers folder (default: random)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--score-batch", type=int, default=8)
    parser.add_argument("--run-steps", type=int, default=3, help="train_run: steps before resume")
    parser.add_argument("--e2e-steps", type=int, default=200)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    if args.check and not torch.cuda.is_available():
        print(
            "error: benchmarks.gpu --check needs a CUDA device and torch.cuda.is_available() is "
            "False; nothing was measured (--cpu-dry-run runs the phases on the CPU)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        failed = run_check(args, args.work.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="dzad-gpu-check-") as tmp:
            failed = run_check(args, Path(tmp))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
