"""The inputs of ``dzad score``: PATH arguments (files, folders, glob patterns) expanded to images.

:func:`collect_inputs` gives every image a unique output name; :func:`decode_batch` decodes each
one once, as its batch is scored (the regimes: the whole call, before anything is written). A bad
input raises :class:`dzad.errors.DZADInputError` (one error line, exit code 2), or with
``--skip-bad`` is warned about and becomes a row marked ``skipped``.
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dzad.errors import DZADInputError

if TYPE_CHECKING:
    import torch

_GLOB_CHARS = set("*?[")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass(frozen=True)
class ScoreInput:
    path: Path  # as found (absolute)
    shown: str  # as the user wrote it / as found under the folder they gave
    rel: Path = Path()  # unique name under the output folders


def _is_image_name(p: Path) -> bool:
    from dzad.data.images import IMAGE_SUFFIXES

    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and _is_image_name(f))


def _expand(arg: str) -> list[tuple[Path, str]]:
    """One PATH argument -> (absolute path, shown name) pairs; DZADInputError when it has none.

    A file given by name is always tried (a non-image then fails to load with a clear error);
    folders and glob matches contribute the files with image suffixes.
    """
    p = Path(arg)
    if p.is_dir():
        files = _image_files(p)
        if not files:
            raise DZADInputError(p, "folder holds no image files (searched recursively)")
        return [(f.resolve(), str(f)) for f in files]
    if p.exists():
        return [(p.resolve(), arg)]
    if _GLOB_CHARS & set(arg):
        out = []
        for m in sorted(glob.glob(arg, recursive=True)):
            mp = Path(m)
            if mp.is_dir():
                out += [(f.resolve(), str(f)) for f in _image_files(mp)]
            elif _is_image_name(mp):
                out.append((mp.resolve(), m))
        if not out:
            raise DZADInputError(p, "no image file matches this pattern")
        return out
    raise DZADInputError(p, "no such file or folder")


def collect_inputs(
    args: list[str], skip_bad: bool, out: Path
) -> tuple[list[ScoreInput], list[dict[str, Any]]]:
    """Expand PATH arguments; unique output names relative to the inputs' common folder.

    Files inside the output folder ``out`` (earlier heat maps) are never inputs. Returns (inputs,
    skipped rows). Without ``skip_bad`` the first bad argument raises.
    """
    found: dict[Path, str] = {}
    skipped: list[dict[str, Any]] = []
    out = out.resolve()
    for arg in args:
        try:
            for path, shown in _expand(arg):
                if not path.is_relative_to(out):
                    found.setdefault(path, shown)
        except DZADInputError as exc:
            if not skip_bad:
                raise
            _warn(f"skipped: {exc}")
            skipped.append(_skipped_row(arg, exc))
    if not found:
        if skipped:
            raise DZADInputError(args[0], "none of the given paths holds a readable image")
        raise DZADInputError(args[0], "no image to score (files inside --out are not inputs)")
    common = Path(os.path.commonpath([p.parent for p in found]))
    return [ScoreInput(p, s, p.relative_to(common)) for p, s in found.items()], skipped


def _skipped_row(shown: str, exc: Exception) -> dict[str, Any]:
    return {
        "path": shown,
        "image_score": None,
        "detection_score": None,
        "decision": "skipped",
        "heatmap": None,
        "error": str(exc),
    }


def _decoded(item: ScoreInput, size: int, resample: str, skip_bad: bool, bad: list):
    """``item`` decoded ``(3, size, size)``, or None after appending its ``skipped`` row to
    ``bad`` (``skip_bad``); without ``skip_bad`` a bad image raises, naming it as given."""
    from dzad.data.images import load_image

    try:
        return load_image(item.path, size, resample)
    except DZADInputError as exc:
        if not skip_bad:
            raise DZADInputError(item.shown, exc.reason) from None
        _warn(f"skipped: {item.shown}: {exc.reason}")
        bad.append(_skipped_row(item.shown, DZADInputError(item.shown, exc.reason)))
        return None


def decode_batch(
    items: list[ScoreInput], size: int, resample: str, skip_bad: bool
) -> tuple[list[ScoreInput], torch.Tensor | None, list[dict[str, Any]]]:
    """Each image of ``items`` decoded once: the readable ones, their batch ``(B, 3, size,
    size)`` in [0, 1] (None when there is none) and the ``skipped`` rows of the others."""
    import torch

    bad: list[dict[str, Any]] = []
    pairs = [(i, _decoded(i, size, resample, skip_bad, bad)) for i in items]
    good = [(i, x) for i, x in pairs if x is not None]
    batch = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], batch, bad
