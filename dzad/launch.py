"""Multi-process training (``train.processes``): one ``accelerate launch`` per checkpoint.

The DVC train stage (``dzad stage train``) and the Prefect train task both train a seed through
:func:`train_launched`: with ``train.processes`` 1 it is :func:`dzad.study.models.train_model` in
this process; with N > 1 it writes the config to a YAML file and runs

    accelerate launch --multi_gpu --num_processes N --num_machines 1 --main_process_port P \\
        -m dzad.launch --params run.yaml --out DIR [--resume]

which runs the same ``train_model`` in N processes (DDP; gloo on CPU, NCCL on GPUs), the main one
calibrating and writing the checkpoint, and :func:`train_launched` reads back (and removes) the
:class:`~dzad.training.TrainResult` totals the main process wrote as ``DIR.result.json``.

Why ``--multi_gpu`` even on CPU: ``accelerate launch --cpu --num_processes 2`` silently starts one
process. ``--multi_gpu`` starts N (torchrun); on a machine without CUDA each then joins a gloo
group because :func:`dzad.training.train` builds its Accelerator with ``cpu=True`` there.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dzad.config import DZADConfig, TrainConfig, to_dict
from dzad.errors import DZADError

if TYPE_CHECKING:
    from dzad.training import TrainResult


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
            "alone (launch with --multi_gpu, as dzad.launch does)"
        )
    if running is not None and running != tc.processes:
        raise ValueError(
            f"train.processes is {tc.processes} but {running} process(es) run this training; "
            "`dzad stage train` (dzad.launch) starts train.processes processes itself"
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
    """The ``accelerate launch`` command running ``python -m dzad.launch ARGS`` N times."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(port or free_port()),
        "-m", "dzad.launch", *args,
    ]  # fmt: skip


def result_path(out_dir: Path) -> Path:
    """Where the main process leaves the run's totals: beside the checkpoint folder."""
    return out_dir.with_name(out_dir.name + ".result.json")


def _write_result(result: Any, out_dir: Path) -> None:
    totals = {
        k: getattr(result, k)
        for k in ("steps", "resumed_from", "losses", "seconds", "images_per_second")
    }
    path = result_path(out_dir)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(totals))
    tmp.replace(path)


def _read_result(out_dir: Path) -> TrainResult:
    from dzad.checkpoint import load_calibration
    from dzad.training import TrainResult

    path = result_path(out_dir)
    totals = json.loads(path.read_text())
    path.unlink()  # the models folder holds checkpoints only
    return TrainResult(checkpoint=out_dir, calibration=load_calibration(out_dir), **totals)


def _child_env() -> dict[str, str]:
    """This environment, with this ``dzad`` package first on the launched processes' path."""
    import dzad

    root = str(Path(dzad.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def train_launched(
    cfg: DZADConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    device: str | None = None,
) -> TrainResult:
    """:func:`dzad.study.models.train_model` of ``cfg`` (one seed) into ``out_dir`` on
    ``train.processes`` processes. Per-step ``callbacks`` run only in-process (N = 1): the
    launched processes cannot reach the caller's objects."""
    from dataclasses import replace

    from dzad.study.models import train_model

    if device is not None:
        cfg = replace(cfg, train=replace(cfg.train, device=device))
    check_processes(cfg.train)
    if cfg.train.processes == 1 or launched():
        return train_model(cfg, out_dir, resume=resume, callbacks=callbacks)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    result_path(out_dir).unlink(missing_ok=True)
    import yaml

    with tempfile.TemporaryDirectory(prefix="dzad-launch-") as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        args = ["--params", str(params), "--out", str(out_dir)] + (["--resume"] if resume else [])
        cmd = launch_command(cfg.train.processes, args)
        proc = subprocess.run(cmd, env=_child_env(), check=False)
    if proc.returncode != 0:
        raise DZADError(
            f"training on {cfg.train.processes} processes failed (exit code {proc.returncode}; "
            f"their output is above): {' '.join(cmd)}"
        )
    return _read_result(out_dir)


def main(argv: list[str] | None = None) -> None:
    """The launched processes' entry: train ``--params`` (one seed) into ``--out``."""
    import argparse

    from dzad.config import load
    from dzad.study.models import train_model

    parser = argparse.ArgumentParser(description="one process of a launched training")
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    result = train_model(load(args.params), args.out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        _write_result(result, args.out)


if __name__ == "__main__":
    main()
