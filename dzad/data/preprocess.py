"""Resized PNG cache of an MVTec-layout dataset plus a manifest table (one row per image).

``out_dir`` is itself an MVTec-layout root (``<category>/<split>/<defect>/<stem>.png`` and
``<category>/ground_truth/<defect>/<stem>_mask.png``, all ``S x S``), so every reader works on it,
and it holds ``manifest.csv`` with the columns :data:`COLUMNS` (original paths relative to the
dataset root, cached paths relative to ``out_dir``, both POSIX; empty strings where a good image has
no mask) and ``fingerprint.json``.

The fingerprint covers the parameters and every input file's path relative to the root, label and
content (SHA-256), never an absolute path or a modification time, so the same images at another
location or in another checkout give byte-identical ``manifest.csv`` and ``fingerprint.json``. When
it matches, :func:`preprocess` returns the stored manifest and writes nothing. Otherwise the whole
cache is rebuilt under a temporary name and swapped in (an interrupted run keeps the old cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from dzad.data.dataset import Sample, collect_samples
from dzad.data.images import image_size as read_size
from dzad.data.images import load_image, load_mask
from dzad.errors import DZADInputError
from dzad.io_utils import atomic_dir, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
FINGERPRINT = "fingerprint.json"
CACHE_VERSION = 2  # bump when the cache's content changes for the same inputs
COLUMNS = [
    "path",
    "cached_path",
    "category",
    "split",
    "label",
    "defect",
    "mask_path",
    "cached_mask_path",
    "orig_w",
    "orig_h",
]


def _relative(path: Path | None, root: Path) -> str:
    """``path`` relative to the dataset ``root`` as a POSIX string ("" for ``None``)."""
    return "" if path is None else path.relative_to(root).as_posix()


def _fingerprint(samples: Sequence[Sample], root: Path, params: dict) -> str:
    """SHA-256 over ``params`` and each input file's root-relative path, label and content hash."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for s in samples:
        for p in (s.path, s.mask_path):
            if p is not None:
                digest.update(f"{_relative(p, root)}\t{sha256_file(p)}\t{s.label}\n".encode())
    return digest.hexdigest()


def _stored_fingerprint(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / FINGERPRINT).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def _save(t: torch.Tensor, path: Path) -> None:
    """Write a ``(C, S, S)`` tensor in [0, 1] as an 8-bit PNG (RGB for C=3, grey for C=1)."""
    arr = np.round(t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path, format="PNG")


def _cache_one(s: Sample, root: Path, tmp: Path, size: int, resample: str, threshold: int) -> dict:
    cached = Path(s.category) / s.split / s.defect / f"{s.path.stem}.png"
    if (tmp / cached).exists():
        raise DZADInputError(s.path, f"another image in its folder has the same stem ({cached})")
    w, h = read_size(s.path)
    _save(load_image(s.path, size, resample), tmp / cached)
    cached_mask = ""
    if s.mask_path is not None:
        mask_rel = Path(s.category) / "ground_truth" / s.defect / f"{s.path.stem}_mask.png"
        _save(load_mask(s.mask_path, threshold, size), tmp / mask_rel)
        cached_mask = mask_rel.as_posix()
    return {
        "path": _relative(s.path, root),
        "cached_path": cached.as_posix(),
        "category": s.category,
        "split": s.split,
        "label": s.label,
        "defect": s.defect,
        "mask_path": _relative(s.mask_path, root),
        "cached_mask_path": cached_mask,
        "orig_w": w,
        "orig_h": h,
    }


def preprocess(
    root: str | Path,
    categories: Sequence[str],
    out_dir: str | Path,
    image_size: int,
    resample: str = "bilinear",
    mask_threshold: int = 0,
    *,
    skip_bad: bool = False,
) -> pd.DataFrame:
    """Cache every image of ``categories`` (empty = all) at ``image_size`` and return the manifest.

    Images are resized with ``resample`` (bilinear / bicubic), masks binarised at ``mask_threshold``
    then resized NEAREST. Bad files raise :class:`DZADInputError`, or are logged and left out when
    ``skip_bad``.
    """
    root, out_dir = Path(root), Path(out_dir)
    samples = collect_samples(root, categories, skip_bad=skip_bad, validate=True)
    if not samples:
        raise DZADInputError(root, "no images to preprocess")
    params = {
        "version": CACHE_VERSION,
        "categories": list(categories),
        "image_size": int(image_size),
        "resample": resample,
        "mask_threshold": int(mask_threshold),
        "skip_bad": skip_bad,
    }
    fingerprint = _fingerprint(samples, root, params)
    if (out_dir / MANIFEST).is_file() and _stored_fingerprint(out_dir) == fingerprint:
        log.info("%s: cache is up to date", out_dir)
        return load_manifest(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise DZADInputError(out_dir, "exists, is not empty and is not a preprocess cache")
    with atomic_dir(out_dir) as tmp:
        rows = []
        for s in samples:
            try:
                rows.append(
                    _cache_one(s, root, tmp, int(image_size), resample, int(mask_threshold))
                )
            except DZADInputError as err:
                if not skip_bad:
                    raise
                log.warning("skipped: %s", err)
        table = pd.DataFrame(rows, columns=COLUMNS)
        table.to_csv(tmp / MANIFEST, index=False)
        record = {"fingerprint": fingerprint, "params": params, "rows": len(table)}
        atomic_write_text(tmp / FINGERPRINT, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return table


def load_manifest(out_dir: str | Path) -> pd.DataFrame:
    """The manifest of a cache as written (``label``, ``orig_w``, ``orig_h`` as int)."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise DZADInputError(path, "no manifest: run `dzad preprocess` first")
    return pd.read_csv(path, dtype=str, keep_default_na=False).astype(
        {"label": int, "orig_w": int, "orig_h": int}
    )


def cached_samples(out_dir: str | Path) -> list[Sample]:
    """Samples pointing at the cached files (for :class:`~dzad.data.dataset.ImageDataset`)."""
    out_dir = Path(out_dir).resolve()
    return [
        Sample(
            out_dir / r.cached_path,
            r.category,
            r.split,
            int(r.label),
            r.defect,
            out_dir / r.cached_mask_path if r.cached_mask_path else None,
        )
        for r in load_manifest(out_dir).itertuples(index=False)
    ]
