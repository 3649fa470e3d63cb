"""Multi-process training (``train.processes``): the ``accelerate launch`` of one checkpoint.

The DVC train stage (``dzad stage train``) and the Prefect train task both train a seed through
:func:`dzad.study.seed_training.train_launched`: with ``train.processes`` 1 it is
:func:`dzad.study.seed_training.train_model` in this process; with N > 1 it writes the config to
a YAML file and runs (:func:`launch_command`)

    accelerate launch --multi_gpu --num_processes N --num_machines 1 --main_process_port P \\
        -m dzad.study.seed_training --params run.yaml --out DIR [--resume]

which runs the same ``train_model`` in N processes (DDP; gloo on CPU, NCCL on GPUs), the main one
calibrating and writing the checkpoint and the run's totals as ``DIR.result.json``
(:func:`write_totals`), which the launching process reads back and removes (:func:`read_totals`).
This module holds the launch mechanics only, so that training (which checks its process count
here) and the study code that launches it do not import each other.

Why ``--multi_gpu`` even on CPU: ``accelerate launch --cpu --num_processes 2`` silently starts one
process. ``--multi_gpu`` starts N (torchrun); on a machine without CUDA each then joins a gloo
group because :func:`dzad.training.train` builds its Accelerator with ``cpu=True`` there.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from dzad.config import TrainConfig


def check_processes(tc: TrainConfig, running: int | None = None) -> None:
    """Raise ValueError when ``train.processes`` cannot split ``train.batch_size``, or when
    ``running`` processes (the Accelerator's count, None before launching) differ from it."""
    if tc.processes < 1:
        raise ValueError(f"train.processes must be >= 1, got {tc.processes}")
    if tc.batch_size % tc.processes:
        raise ValueError(
            f"train.batch_size {tc.batch_size} is not divisible by train.processes "
            f"{tc.processes}: each process takes batch_size / processes images per step"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if running is not None and world != running:
        raise ValueError(
            f"accelerate started {world} processes but this one sees {running}: each would train "
            "alone (launch with --multi_gpu, as launch_command does)"
        )
    if running is not None and running != tc.processes:
        raise ValueError(
            f"train.processes is {tc.processes} but {running} process(es) run this training; "
            "`dzad stage train` (dzad.study.seed_training.train_launched) starts train.processes "
            "processes itself"
        )


def launched() -> bool:
    """Whether this process was started by ``accelerate launch`` / torchrun."""
    return "LOCAL_RANK" in os.environ


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the process group's rendezvous (parallel runs differ)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(processes: int, args: list[str], port: int | None = None) -> list[str]:
    """The ``accelerate launch`` command running ``python -m dzad.study.seed_training ARGS`` N
    times."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(port or free_port()),
        "-m", "dzad.study.seed_training", *args,
    ]  # fmt: skip


def result_path(out_dir: Path) -> Path:
    """Where the main process leaves the run's totals: beside the checkpoint folder."""
    return out_dir.with_name(out_dir.name + ".result.json")


def write_totals(result: Any, out_dir: Path) -> None:
    """The main process's training totals (a ``dzad.training.TrainResult``) beside ``out_dir``."""
    totals = {
        k: getattr(result, k)
        for k in ("steps", "resumed_from", "losses", "seconds", "images_per_second")
    }
    path = result_path(out_dir)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(totals))
    tmp.replace(path)


def read_totals(out_dir: Path) -> dict[str, Any]:
    """The totals :func:`write_totals` left beside ``out_dir``, removed once read (the models
    folder holds checkpoints only)."""
    path = result_path(out_dir)
    totals = json.loads(path.read_text())
    path.unlink()
    return totals


def child_env() -> dict[str, str]:
    """This environment, with this ``dzad`` package first on the launched processes' path."""
    import dzad

    root = str(Path(dzad.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
