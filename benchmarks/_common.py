"""Shared pieces of the benchmarks: a calibrated model from scratch, synthetic data, timers.

The model is built the way training builds it (``dzad.latents`` encoder fitted on SOURCE-like
images, ``dzad.networks.build_network`` with fresh random weights, the noise bank, and the
library's SOURCE-only calibration ``dzad.training.calibrate_on_source``), without the training
steps: speed does not depend on the weights' values. Every figure printed is measured in the
calling process; nothing is hard-coded.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from flows import TELEMETRY_OFF

REPO = Path(__file__).resolve().parents[1]
DEMO_STUDY = REPO / "studies" / "demo.yaml"
os.environ.update(TELEMETRY_OFF)


def add_common_args(parser) -> None:
    """``--threads`` and ``--quick``, shared by every benchmark."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared, loaded machine 2 threads wait on "
        "each other and run several times slower; use the core count on an idle machine)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: a tiny workload")


def setup(args) -> None:
    """Apply ``--threads`` (before any timing)."""
    torch.set_num_threads(args.threads)


def demo_config(latent: str | None = None, quick: bool = False):
    """The ``demo`` study's config (``studies/demo.yaml``), optionally with another latent.

    ``quick`` (smoke tests) keeps the pipeline but shrinks the work: 2 noise stages, 2 DDIM steps.
    """
    from dzad.config import load

    cfg = load(DEMO_STUDY)
    if latent is not None:
        cfg = replace(cfg, model=replace(cfg.model, latent=latent))
    if quick:
        cfg = replace(
            cfg,
            noise=replace(cfg.noise, n_stages=2),
            reconstruction=replace(cfg.reconstruction, steps=2),
            detection=replace(cfg.detection, gating_bank_size=4),
        )
    return cfg


def synthetic_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``(n, 3, size, size)`` float32 in [0, 1]: smooth random textures (seeded)."""
    rng = np.random.default_rng(seed)
    raw = ndimage.gaussian_filter(rng.standard_normal((n, 3, size, size)), sigma=(0, 0, 2, 2))
    raw = (raw - raw.mean()) / (raw.std() * 6) + 0.5
    return torch.from_numpy(np.clip(raw, 0, 1).astype(np.float32))


def _png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_pngs(folder: Path, n: int, size: int, seed: int = 0, chunk: int = 256) -> list[Path]:
    """Write ``n`` synthetic RGB PNGs ``img_00000.png ...`` into ``folder``; their paths."""
    paths = []
    for start in range(0, n, chunk):
        batch = synthetic_images(min(chunk, n - start), size, seed + start)
        for k, img in enumerate((batch.permute(0, 2, 3, 1).numpy() * 255).round()):
            p = folder / f"img_{start + k:05d}.png"
            _png(p, img.astype(np.uint8))
            paths.append(p)
    return paths


def link_images(paths: list[Path], folder: Path) -> Path:
    """``folder`` holding symlinks to ``paths`` (same names); returns ``folder``."""
    folder.mkdir(parents=True)
    for p in paths:
        (folder / p.name).symlink_to(p)
    return folder


def write_mvtec(root: Path, category: str, n: int, size: int, seed: int = 0) -> Path:
    """An MVTec-layout category with ``n`` test images (half ``good``, half ``defect`` with a square
    mask each) under ``root/category``; returns ``root``."""
    n_good = n // 2
    write_pngs(root / category / "test" / "good", n_good, size, seed)
    defect = root / category / "test" / "defect"
    write_pngs(defect, n - n_good, size, seed + 10_000)
    rng = np.random.default_rng(seed)
    for p in sorted(defect.glob("*.png")):
        mask = np.zeros((size, size), dtype=np.uint8)
        y, x = rng.integers(0, size * 3 // 4, 2)
        mask[y : y + size // 4, x : x + size // 4] = 255
        _png(root / category / "ground_truth" / "defect" / f"{p.stem}_mask.png", mask)
    return root


def build_model(cfg, n_source: int = 16, device: str | torch.device = "cpu"):
    """A calibrated :class:`dzad.model.DZAD` with random network weights for ``cfg``.

    The encoder is fitted and the detector calibrated on ``n_source`` synthetic SOURCE images
    (through the library's own functions), exactly as after training.
    """
    from dzad.calibration import calibrate_on_source
    from dzad.data.source import ImageSource
    from dzad.latents import build_encoder
    from dzad.model import DZAD, map_backbone
    from dzad.networks import build_network, make_scheduler
    from dzad.noise_features import NoiseBank

    size = cfg.data.image_size
    torch.manual_seed(cfg.seed)
    source = ImageSource(synthetic_images(n_source, size, seed=cfg.seed + 99))
    idx = torch.arange(len(source))
    encoder = build_encoder(cfg.model, size).to(device)
    encoder.fit(source.batches(idx, 8))
    shape = encoder.latent_shape(size)
    net = build_network(cfg.model, shape[0], shape[1], image_size=size).to(device)
    alphas = make_scheduler(cfg.model).alphas_cumprod.to(device)
    bank = NoiseBank.create(cfg.noise, cfg.model.num_train_timesteps, shape)
    backbone = map_backbone(cfg, encoder)
    backbone = backbone.to(device) if backbone is not None else None
    calib = calibrate_on_source(
        cfg, net, encoder, bank, alphas, source, idx, torch.device(device), backbone=backbone
    )
    return DZAD(cfg, encoder, net, bank, calib, backbone).to(device)


def with_precision(model, precision: str):
    """``model`` (a :class:`dzad.model.DZAD`, same modules and calibration) scoring in
    ``noise.precision`` ``precision`` (``fp32`` / ``bf16``)."""
    from dzad.model import DZAD

    cfg = replace(model.cfg, noise=replace(model.cfg.noise, precision=precision))
    return DZAD(cfg, model.encoder, model.net, model.bank, model.calibration, model.backbone)


def forwards_per_image(cfg) -> int:
    """Denoiser+SG evaluations scoring one image needs: N*M noise features + DDIM steps."""
    return cfg.noise.n_stages * cfg.noise.m_samples + cfg.reconstruction.steps


@dataclass(frozen=True)
class Span:
    """Seconds on the wall clock and on this process's CPU clock.

    With one torch thread the CPU time is what the work costs whatever else the machine runs;
    the wall time also counts waiting for a core (and for the disk).
    """

    wall: float
    cpu: float

    def __truediv__(self, k: float) -> Span:
        return Span(self.wall / k, self.cpu / k)


def stopwatch() -> Callable[[], Span]:
    """Start both clocks; the returned callable gives the :class:`Span` since then."""
    wall, cpu = time.perf_counter(), time.process_time()
    return lambda: Span(time.perf_counter() - wall, time.process_time() - cpu)


def median_span(spans: list[Span]) -> Span:
    """Median of each clock over ``spans``."""
    return Span(statistics.median(s.wall for s in spans), statistics.median(s.cpu for s in spans))


def timed(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> Span:
    """Median :class:`Span` of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    spans = []
    for _ in range(repeats):
        lap = stopwatch()
        fn()
        spans.append(lap())
    return median_span(spans)


def matmul_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an ``n x n`` matmul per CPU second (best of ``repeats``; 2 n^3 FLOPs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b), repeats=1, warmup=0).cpu for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def machine() -> dict[str, Any]:
    """Load average at measurement time, cores and torch threads (figures depend on them)."""
    return {
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def tidy(v: Any) -> Any:
    """Floats to 4 significant digits, recursively."""
    if isinstance(v, float):
        return float(f"{v:.4g}")
    if isinstance(v, dict):
        return {k: tidy(x) for k, x in v.items()}
    return v


def emit(figures: dict[str, Any]) -> None:
    """Print the one JSON line of a benchmark (floats rounded to 4 significant digits)."""
    print(json.dumps(tidy({**figures, **machine()})), flush=True)
