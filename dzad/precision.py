"""One precision for the calibration and the scoring forwards (``noise.precision``).

The SOURCE statistics, tau and the reference scores must come from the same arithmetic as the
scores they are compared with, so :func:`dzad.calibration.calibrate_on_source` and
:class:`dzad.model.DZAD` both run their network forwards inside :func:`scoring_precision`.
``auto`` is bf16 autocast on a CUDA device that supports it and fp32 elsewhere (CPU); ``bf16``
forces autocast on any device (the CPU parity test), ``fp32`` turns it off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(name: str, device: torch.device | str) -> torch.dtype:
    """``noise.precision`` on ``device`` -> the dtype the forwards compute in."""
    if name not in PRECISIONS:
        raise ValueError(f"noise.precision must be one of {list(PRECISIONS)}, got {name!r}")
    device = torch.device(device)
    if name == "bf16":
        return torch.bfloat16
    if name == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@contextlib.contextmanager
def scoring_precision(name: str, device: torch.device | str) -> Iterator[torch.dtype]:
    """Autocast block of ``noise.precision`` on ``device``; yields the resolved dtype."""
    device = torch.device(device)
    dtype = resolve_precision(name, device)
    enabled = dtype != torch.float32
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
        yield dtype
