"""One checkpoint per seed (``train``): eq. 8 training on the SOURCE normals of the caches, in
this process or on ``train.processes`` processes (:mod:`dzad.launch`; the launched processes run
this module: ``python -m dzad.study.seed_training --params run.yaml --out DIR``)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from dzad.config import DZADConfig, to_dict
from dzad.errors import CheckpointError, DZADError
from dzad.launch import (
    check_processes,
    child_env,
    launch_command,
    launched,
    read_totals,
    result_path,
    write_totals,
)
from dzad.study.layout import seed_dir, source_cache_refs, with_seed
from dzad.training_data import data_record


def train_model(
    cfg: DZADConfig,
    out_dir: Path,
    *,
    seed: int | None = None,
    resume: bool = False,
    callbacks: Sequence[Callable[..., Any] | Any] = (),
    device: str | None = None,
):
    """eq. 8 training on the SOURCE normals + source-only calibration -> checkpoint ``out_dir``.

    Reads the caches of :func:`dzad.study.data.preprocess_data`. The learned weighting and the
    prototype mode also get the labelled SOURCE test split (source data, never the target's).
    Returns the :class:`dzad.training.TrainResult`.
    """
    from dzad.calibration import needs_labelled
    from dzad.data.dataset import ImageDataset
    from dzad.data.source import source_labelled, source_normals
    from dzad.training import train

    if seed is not None:
        cfg = with_seed(cfg, seed)
    if device is not None:
        cfg = replace(cfg, train=replace(cfg.train, device=device))
    refs, size = source_cache_refs(cfg), cfg.data.image_size
    normals = source_normals(refs, skip_bad=cfg.data.skip_bad)
    images = ImageDataset(normals, size, cfg.data)
    labelled = source_labelled(refs, size, cfg.data) if needs_labelled(cfg) else None
    data = data_record(cfg.sets.source, normals)
    return train(
        cfg, images, out_dir, resume, callbacks, labelled=labelled, progress=False, data=data
    )


def resumable(models_dir: str | Path, seeds: Sequence[int]) -> dict[int, bool]:
    """``{seed: has a checkpoint to continue}`` for a study-wide resume: the seeds a crash left
    behind continue, the others start; with nothing to continue at all it is an error."""
    found = {s: (seed_dir(models_dir, s) / "dzad.json").is_file() for s in seeds}
    if not any(found.values()):
        raise CheckpointError(models_dir, "nothing to resume: no seed_<s>/ checkpoint here")
    return found


def train_seeds(
    cfg: DZADConfig, models_dir: str | Path, *, resume: bool = False, **kwargs: Any
) -> dict[int, Any]:
    """:func:`train_model` once per ``cfg.seeds`` into ``models_dir/seed_<s>`` (``resume``: see
    :func:`resumable`), on ``train.processes`` processes (:func:`train_launched`)."""
    cont = resumable(models_dir, cfg.seeds) if resume else dict.fromkeys(cfg.seeds, False)
    return {
        s: train_launched(with_seed(cfg, s), seed_dir(models_dir, s), resume=cont[s], **kwargs)
        for s in cfg.seeds
    }


def train_launched(
    cfg: DZADConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    device: str | None = None,
):
    """:func:`train_model` of ``cfg`` (one seed) into ``out_dir`` on ``train.processes``
    processes (:mod:`dzad.launch`). Per-step ``callbacks`` run only in-process (N = 1): the
    launched processes cannot reach the caller's objects."""
    from dzad.checkpoint import load_calibration
    from dzad.training import TrainResult

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
        proc = subprocess.run(cmd, env=child_env(), check=False)
    if proc.returncode != 0:
        raise DZADError(
            f"training on {cfg.train.processes} processes failed (exit code {proc.returncode}; "
            f"their output is above): {' '.join(cmd)}"
        )
    totals = read_totals(out_dir)
    return TrainResult(checkpoint=out_dir, calibration=load_calibration(out_dir), **totals)


def main(argv: list[str] | None = None) -> None:
    """The launched processes' entry: train ``--params`` (one seed) into ``--out``."""
    import argparse

    from dzad.config import load

    parser = argparse.ArgumentParser(description="one process of a launched training")
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    result = train_model(load(args.params), args.out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        write_totals(result, args.out)


if __name__ == "__main__":
    main()
