"""Names and folders of a study: SOURCE and target datasets, their resized caches, the seed folders
and the seeds' checkpoints (the folder layout of :mod:`dzad.study`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from dzad.config import DatasetRef, DZADConfig
from dzad.errors import DZADInputError

SEED_DIR = "seed_{}"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def source_refs(cfg: DZADConfig) -> list[DatasetRef]:
    if not cfg.sets.source:
        raise ValueError("sets.source is empty: a study needs at least one SOURCE dataset")
    return list(cfg.sets.source)


def target_ref(cfg: DZADConfig, target: str) -> DatasetRef:
    if target not in cfg.sets.targets:
        raise ValueError(f"unknown target {target!r}; sets.targets has {sorted(cfg.sets.targets)}")
    if not _NAME.fullmatch(target):
        raise ValueError(f"target name {target!r} must match {_NAME.pattern} (it names folders)")
    return cfg.sets.targets[target]


def source_cache(cfg: DZADConfig, index: int) -> Path:
    """Resized cache of the ``index``-th SOURCE dataset."""
    return Path(cfg.data.cache_dir) / "source" / str(index)


def source_caches(cfg: DZADConfig) -> list[Path]:
    """Resized caches of every SOURCE dataset, in ``sets.source`` order."""
    return [source_cache(cfg, i) for i in range(len(source_refs(cfg)))]


def source_cache_refs(cfg: DZADConfig) -> list[DatasetRef]:
    """The SOURCE caches as datasets: each cache with its ``sets.source`` entry's categories, so
    they are read in the order the study lists them (:func:`dzad.data.source.source_normals`)."""
    pairs = zip(source_caches(cfg), source_refs(cfg), strict=True)
    return [DatasetRef(str(cache), ref.categories) for cache, ref in pairs]


def target_cache(cfg: DZADConfig, target: str) -> Path:
    """Resized cache of one target dataset."""
    target_ref(cfg, target)
    return Path(cfg.data.cache_dir) / "targets" / target


def seed_dir(folder: str | Path, seed: int) -> Path:
    return Path(folder) / SEED_DIR.format(seed)


def with_seed(cfg: DZADConfig, seed: int) -> DZADConfig:
    return replace(cfg, seed=int(seed))


def checkpoints(models: str | Path, seeds: Sequence[int]) -> dict[int, Path]:
    """``{seed: checkpoint}`` of a models folder (``seed_<s>/``) or of one checkpoint folder."""
    models = Path(models)
    if (models / "dzad.json").is_file():
        return {int(seeds[0]): models}
    found = {int(s): seed_dir(models, s) for s in seeds}
    for s, path in found.items():
        if not (path / "dzad.json").is_file():
            raise DZADInputError(path, f"no checkpoint for seed {s}: run `dzad stage train` first")
    return found
