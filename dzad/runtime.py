"""How a command runs, not what it computes: the device, torch's thread count and ``torch.compile``.

:func:`choose_device` turns a ``train.device`` value into the device training, the study's
evaluations and ``dzad score`` run on.

``runtime.threads`` (``--threads``) sets torch's intra-op threads: on a 2-core machine shared with
other jobs, two threads were measured 3-77x slower than one (docs/benchmarks.md), so a busy
machine wants 1; 0 keeps torch's default (the core count, or ``OMP_NUM_THREADS``).

``runtime.compile`` (``--compile``) wraps the denoiser+SG forward, ~85 % of scoring, in
``torch.compile`` (inductor, static shapes). Measured (docs/benchmarks.md): on this project's
2-core CPU a compiled forward was 1.3-1.4x faster, but each batch shape cost 8 s (warm inductor
cache) to 340-500 s (cold, loaded machine) to compile, and the compiled detection score moved by
6e-5 relative on one image of the tiny model (``tests/test_runtime.py``; image score and map under
1e-6) and the demo's scores by 1.3e-5 of the largest (``benchmarks.score``), above the project's
1e-5 bar. So
``auto`` (:data:`COMPILE_DEFAULT`) compiles on no device: ``on`` is an explicit opt-in for long
scoring jobs that accept that difference. CUDA has not been measured yet.
"""

from __future__ import annotations

import torch

from dzad.config import DEVICES, RuntimeConfig

COMPILE_DEFAULT = {"cpu": False, "cuda": False}  # measured defaults per device type (see above)


def choose_device(setting: str) -> torch.device:
    """The device a ``train.device`` value names: ``auto`` is the GPU when one is visible, else
    the CPU. ValueError for any other value, and for ``cuda`` when no GPU is visible (a run
    asked for a GPU stops instead of running on the CPU)."""
    if setting not in DEVICES:
        raise ValueError(f"train.device must be one of {', '.join(DEVICES)}, got {setting!r}")
    cuda = torch.cuda.is_available()
    if setting == "cuda" and not cuda:
        raise ValueError("train.device is cuda but no GPU is visible")
    if setting == "auto":
        return torch.device("cuda" if cuda else "cpu")
    return torch.device(setting)


def set_threads(threads: int) -> None:
    """torch intra-op threads; 0 leaves torch's default."""
    if threads > 0:
        torch.set_num_threads(threads)


def use_compile(cfg: RuntimeConfig, device: torch.device) -> bool:
    """Whether scoring on ``device`` compiles the network under ``cfg.compile``."""
    if cfg.compile == "auto":
        return COMPILE_DEFAULT.get(device.type, False)
    return cfg.compile == "on"


def compile_network(net: torch.nn.Module) -> None:
    """Replace ``net.predict_noise`` by its ``torch.compile`` (static shapes: one compilation per
    batch shape, reused for every later batch of that shape). Inference only: the module and its
    saved weights are unchanged."""
    net.predict_noise = torch.compile(net.predict_noise, dynamic=False)


def apply_runtime(cfg: RuntimeConfig, model=None) -> None:
    """Apply ``cfg`` to this process (threads) and, when given, a :class:`dzad.model.DZAD` about
    to score (compile)."""
    set_threads(cfg.threads)
    if model is not None and use_compile(cfg, model.device):
        compile_network(model.net)
