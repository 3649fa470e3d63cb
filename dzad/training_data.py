"""What a checkpoint was trained on: roots, categories, image count and a content hash.

Saved as ``data`` in ``dzad.json`` (:func:`dzad.training.train`), shown by ``dzad evaluate`` /
``dzad models`` / MLflow, and compared on ``resume``: a run never continues on other data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dzad.config import DatasetRef
from dzad.errors import CheckpointError
from dzad.io_utils import sha256_file


def manifest_sha256(samples: Sequence[Any]) -> str:
    """sha256 of the sorted lines ``<category>/<split>/<defect>/<file name> <sha256 of its bytes>``
    of the training images: the same files in any order or folder give the same hash."""
    lines = sorted(
        f"{s.category}/{s.split}/{s.defect}/{Path(s.path).name} {sha256_file(Path(s.path))}"
        for s in samples
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def data_record(refs: Sequence[DatasetRef], samples: Sequence[Any]) -> dict[str, Any]:
    """``{"roots", "categories", "images", "manifest_sha256"}`` of the SOURCE normals ``samples``
    read from the datasets ``refs`` (categories: those the samples come from)."""
    return {
        "roots": [str(r.root) for r in refs],
        "categories": sorted({s.category for s in samples}),
        "images": len(samples),
        "manifest_sha256": manifest_sha256(samples),
    }


def check_same_data(new: dict[str, Any] | None, old: dict[str, Any] | None, folder: Path) -> None:
    """Resume only on the data the checkpoint was trained on (same images, same bytes)."""
    if new is None:
        return
    if old is None:
        raise CheckpointError(folder, "cannot resume: the checkpoint has no record of its data")
    keys = ("images", "manifest_sha256")
    if any(new[k] != old.get(k) for k in keys):
        raise CheckpointError(
            folder,
            f"cannot resume: the source data differs ({new['images']} images, manifest "
            f"{new['manifest_sha256'][:12]} vs the checkpoint's {old.get('images')} images, "
            f"manifest {str(old.get('manifest_sha256'))[:12]})",
        )


def describe(record: dict[str, Any] | None) -> str:
    """One line: ``3 images of weave, grain from data/raw/synth/textures (manifest sha256 ...)``."""
    if not record:
        return "training data not recorded"
    return (
        f"{record['images']} images of {', '.join(record['categories'])} from "
        f"{', '.join(record['roots'])} (manifest sha256 {record['manifest_sha256'][:12]})"
    )
