"""Dataset roots of a study (``prepare``) and their resized caches (``preprocess``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dzad.config import DatasetRef, DZADConfig
from dzad.errors import DZADInputError
from dzad.io_utils import atomic_write_text
from dzad.study.layout import source_cache, source_refs, target_cache, target_ref

DATASETS_JSON = "datasets.json"


# ---------------------------------------------------------------------------------------- prepare
def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _describe(ref: DatasetRef) -> dict[str, Any]:
    """Image counts per category and split of one root (file names only; nothing is decoded)."""
    from dzad.data.dataset import iter_samples, list_categories

    root = Path(ref.root)
    known = list_categories(root)
    missing = sorted(set(ref.categories) - set(known))
    if missing:
        raise DZADInputError(root, f"categories {missing} not found; it has {known}")
    counts = {}
    for cat in ref.categories or known:
        samples = [s for split in ("train", "test") for s in iter_samples(root, cat, split)]
        counts[cat] = {
            "train": sum(s.split == "train" for s in samples),
            "test_good": sum(s.split == "test" and s.label == 0 for s in samples),
            "test_defect": sum(s.label == 1 for s in samples),
        }
    return {"root": str(root), "categories": counts}


def prepare_data(
    cfg: DZADConfig,
    *,
    raw_dir: str | Path = "data/raw",
    download_dir: str | Path = "data/downloads",
) -> dict[str, Path]:
    """Make every dataset root of the study exist; returns ``{dataset name: MVTec root}``.

    Generates ``synth.families`` (demo; none when empty) into ``synth.dest``, downloads and
    converts ``sets.fetch`` (paper; archives are kept in ``download_dir`` so an interrupted
    download resumes) into ``raw_dir/<name>``, and uses any other root where it is (shared). Writes
    ``raw_dir/datasets.json`` with the image counts of every root it checked.
    """
    from dzad.data import fetch, synth

    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    s = cfg.synth
    if s.families:
        dest = Path(s.dest)
        if not _inside(dest, raw_dir):
            raise ValueError(f"synth.dest {dest} must lie inside {raw_dir} (the stage's output)")
        synth.generate(dest, s.seed, s.size, s.n_train, s.n_test_good, s.n_test_defect, s.families)
    for name in cfg.sets.fetch:
        if name not in fetch.DATASETS:
            raise ValueError(
                f"sets.fetch: unknown dataset {name!r}; known: {sorted(fetch.DATASETS)}"
            )
        spec = fetch.DATASETS[name]
        archive = fetch.download(spec.url, Path(download_dir) / spec.filename, spec.sha256)
        fetch.fetch(name, raw_dir, archive=archive)
    names = {f"source_{i}": ref for i, ref in enumerate(source_refs(cfg))}
    names.update({t: target_ref(cfg, t) for t in cfg.sets.targets})
    record = {name: _describe(ref) for name, ref in names.items()}
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    atomic_write_text(raw_dir / DATASETS_JSON, text)
    return {name: Path(ref.root) for name, ref in names.items()}


# ------------------------------------------------------------------------------------- preprocess
def _cache(cfg: DZADConfig, ref: DatasetRef, out: Path) -> Path:
    from dzad.data.preprocess import preprocess

    d = cfg.data
    preprocess(
        ref.root,
        ref.categories,
        out,
        d.image_size,
        d.resample,
        d.mask_threshold,
        skip_bad=d.skip_bad,
    )
    return out


def preprocess_data(
    cfg: DZADConfig, *, source: bool = True, targets: Sequence[str] | None = None
) -> dict[str, Path]:
    """Resized cache + manifest of the SOURCE datasets and of ``targets`` (None = every target).

    Returns ``{name: cached root}`` (names ``source_<i>`` and the target names). A cache whose
    inputs and parameters did not change is left as it is.
    """
    out: dict[str, Path] = {}
    if source:
        for i, ref in enumerate(source_refs(cfg)):
            out[f"source_{i}"] = _cache(cfg, ref, source_cache(cfg, i))
    for name in cfg.sets.targets if targets is None else targets:
        out[name] = _cache(cfg, target_ref(cfg, name), target_cache(cfg, name))
    return out
