"""One checkpoint per seed (``train``): eq. 8 training on the SOURCE normals of the caches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dzad.config import DZADConfig
from dzad.errors import CheckpointError, DZADInputError
from dzad.study.data import cached
from dzad.study.layout import seed_dir, source_caches, with_seed
from dzad.training_data import data_record


def source_normals(cfg: DZADConfig) -> list:
    """SOURCE ``train/good`` samples of every source cache, in cache order (training's order)."""
    caches = source_caches(cfg)
    normals = [s for c in caches for s in cached(c, "train", 0)]
    if not normals:
        raise DZADInputError(caches[0], "no SOURCE normal training images (train/good)")
    return normals


def source_labelled(cfg: DZADConfig):
    """The labelled SOURCE split (``test/``: images, labels), for learned weights / prototypes."""
    from dzad.data.dataset import ImageDataset

    caches = source_caches(cfg)
    test = [s for c in caches for s in cached(c, "test")]
    if not test:
        raise DZADInputError(caches[0], "the labelled SOURCE split (test/) is empty")
    return ImageDataset(test, cfg.data.image_size, cfg.data), np.array([s.label for s in test])


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
    from dzad.training import train

    if seed is not None:
        cfg = with_seed(cfg, seed)
    if device is not None:
        cfg = replace(cfg, train=replace(cfg.train, device=device))
    normals = source_normals(cfg)
    images = ImageDataset(normals, cfg.data.image_size, cfg.data)
    labelled = source_labelled(cfg) if needs_labelled(cfg) else None
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
    :func:`resumable`), on ``train.processes`` processes (:func:`dzad.launch.train_launched`)."""
    from dzad.launch import train_launched

    cont = resumable(models_dir, cfg.seeds) if resume else dict.fromkeys(cfg.seeds, False)
    return {
        s: train_launched(with_seed(cfg, s), seed_dir(models_dir, s), resume=cont[s], **kwargs)
        for s in cfg.seeds
    }
