"""Load a diffusers model folder from local files only: no hub, no network, no process-global state.

``ModelMixin.from_pretrained`` treats a folder it cannot find as a hub repo id (HEAD requests) and,
while it builds the model, patches ``torch.nn.init`` and (with accelerate) ``nn.Module``'s
parameter registration for the whole process: a model built or loaded in another thread at the same
time gets meta tensors or skipped initialisation (concurrent ``DZAD.from_checkpoint`` calls).
Here the model is built from its ``config.json`` on the meta device (a thread-local torch function
mode, so other threads are untouched and no random initialisation runs) and its safetensors weights
are assigned in place, strictly: every parameter and buffer must come from the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dzad.errors import CheckpointError

CONFIG, WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"
M = TypeVar("M", bound=torch.nn.Module)


def require_parts(folder: Path, parts: list[str]) -> None:
    """CheckpointError naming the first of ``parts`` (relative paths) missing under ``folder``."""
    for part in parts:
        if not (folder / part).exists():
            raise CheckpointError(folder, f"incomplete checkpoint: {part} is missing")


def load_local(cls: type[M], folder: str | Path) -> M:
    """``cls`` (a diffusers ``ModelMixin``) from ``folder/config.json`` + its safetensors weights.

    Raises :class:`CheckpointError` naming the missing or unreadable part; reads nothing else.
    """
    folder = Path(folder)
    require_parts(folder.parent, [f"{folder.name}/{CONFIG}", f"{folder.name}/{WEIGHTS}"])
    try:
        config: dict[str, Any] = json.loads((folder / CONFIG).read_text())
        state = load_file(str(folder / WEIGHTS))
        with torch.device("meta"):  # thread-local: shapes only, no init, no RNG draw
            model = cls.from_config(config)
        model.load_state_dict(state, strict=True, assign=True)
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(folder, f"cannot load {cls.__name__}: {exc}") from exc
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a buffer the file does not hold would stay without data
        raise CheckpointError(folder, f"{cls.__name__}: no weights for {left[:3]}")
    return model.eval()
