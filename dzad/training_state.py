"""What training changes and resume restores: trainable weights, EMA, optimizer, LR schedule.

:class:`Optimisation` bundles them; :func:`state_tensors` writes them as safetensors tensors + JSON
(the checkpoint's ``train_state/``) and :func:`restore` reads them back, so a resumed run continues
bit-for-bit (the step's draws are functions of the seed and the step: :mod:`dzad.training_loop`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dzad.checkpoint import read_train_state
from dzad.config import TrainConfig
from dzad.errors import CheckpointError


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
        assign(params, self.shadow)
        try:
            yield
        finally:
            assign(params, raw)


@torch.no_grad()
def assign(params: dict[str, nn.Parameter], values: dict[str, Tensor]) -> None:
    for k, p in params.items():
        p.copy_(values[k])


@dataclass
class Optimisation:
    """The trainable weights ``params`` (by name) of a network, their AdamW optimizer with linear
    warm-up, and their EMA (None when ``train.ema`` is off)."""

    params: dict[str, nn.Parameter]
    opt: torch.optim.Optimizer
    lr_sched: torch.optim.lr_scheduler.LambdaLR
    ema: EMA | None

    def scoring_weights(self) -> contextlib.AbstractContextManager[None]:
        """Context in which ``params`` hold the weights that score: the EMA ones when it is on."""
        return self.ema.applied(self.params) if self.ema is not None else contextlib.nullcontext()


def build_optimisation(net: nn.Module, tc: TrainConfig) -> Optimisation:
    params = {k: p for k, p in net.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=tc.lr, weight_decay=tc.weight_decay)
    warm = max(1, tc.warmup_steps)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    return Optimisation(params, opt, lr_sched, EMA(params, tc.ema_decay) if tc.ema else None)


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


def state_tensors(o: Optimisation, step: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``train_state/`` of the checkpoint after ``step`` steps: raw weights ``raw.<name>``, EMA
    ``ema.<name>``, optimizer ``opt.*`` tensors; step, optimizer scalars, LR schedule as JSON."""
    tensors = {f"raw.{k}": p.detach().cpu().clone() for k, p in o.params.items()}
    opt_tensors, opt_meta = _optimizer_state(o.opt)
    tensors.update(opt_tensors)
    if o.ema is not None:
        tensors.update({f"ema.{k}": v.cpu() for k, v in o.ema.shadow.items()})
    meta: dict[str, Any] = {
        "step": step,
        "optimizer": opt_meta,
        "lr_scheduler": o.lr_sched.state_dict(),
        "ema_updates": o.ema.updates if o.ema else 0,
    }
    return tensors, meta


def resume_state(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The training state to continue; an error when ``folder`` holds nothing to resume."""
    if not (folder / "dzad.json").exists():
        raise CheckpointError(folder, "nothing to resume: no checkpoint here (drop --resume)")
    state = read_train_state(folder)
    if state is None:
        raise CheckpointError(folder, "nothing to resume: the checkpoint has no train_state/")
    return state


def restore(
    o: Optimisation, state: tuple[dict[str, Tensor], dict[str, Any]], device: torch.device
) -> int:
    """Put ``state`` (:func:`state_tensors`) back into ``o``; returns the step to continue from.

    The network's other weights (frozen parts, buffers) come from the checkpoint's scoring
    weights, loaded by the caller first."""
    tensors, meta = state
    assign(o.params, {k[4:]: v for k, v in tensors.items() if k.startswith("raw.")})
    _load_optimizer(o.opt, tensors, meta["optimizer"])
    o.lr_sched.load_state_dict(meta["lr_scheduler"])
    if o.ema is not None:
        o.ema.shadow = {k: tensors[f"ema.{k}"].to(device) for k in o.params}
        o.ema.updates = meta["ema_updates"]
    return int(meta["step"])
