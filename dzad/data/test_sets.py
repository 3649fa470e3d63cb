"""What an evaluation scores: a :class:`TestSet`, an MVTec-layout root (:class:`MVTecRoot`, each
category's ``test/`` split) or a plain folder layout (:class:`FolderSet`, anomalib's Folder:
normal / abnormal / masks folders, one category). Each lists a category's samples once and reuses
the listing (:class:`_ListedOnce`). Bad input raises :class:`~dzad.errors.DZADInputError` naming
the file, as in :mod:`dzad.data.dataset`.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dzad.data.dataset import (
    GOOD,
    Sample,
    fail_or_skip,
    image_files,
    iter_samples,
    list_categories,
)
from dzad.errors import DZADInputError


class TestSet(Protocol):
    """The test images of an evaluation: ``root`` names the images in its outputs (pictures,
    ``report.html``), ``categories(requested)`` are those it scores (``requested``, or all when
    empty), ``samples(category, skip_bad)`` a category's test samples in listing order (a defect
    image may lack its mask: ``mask_path`` None, image metrics only)."""

    @property
    def root(self) -> Path: ...

    def categories(self, requested: Sequence[str] = ()) -> list[str]: ...

    def samples(self, category: str, skip_bad: bool = False) -> list[Sample]: ...


def as_test_set(data: str | Path | TestSet) -> TestSet:
    """``data`` as a :class:`TestSet`: a path is an MVTec-layout root."""
    return MVTecRoot(Path(data)) if isinstance(data, str | os.PathLike) else data


@dataclass(frozen=True)
class _ListedOnce(abc.ABC):
    """:meth:`samples` lists each category once per test set (per ``skip_bad``) and reuses it,
    so a caller's early check or progress total and the evaluation read the folders once, and a
    skipped file is warned about once."""

    _listed: dict[tuple[str, bool], list[Sample]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @abc.abstractmethod
    def _list(self, category: str, skip_bad: bool) -> list[Sample]:
        """``category``'s test samples, read from the folders."""

    def samples(self, category: str, skip_bad: bool = False) -> list[Sample]:
        key = (category, skip_bad)
        if key not in self._listed:
            self._listed[key] = self._list(category, skip_bad)
        return list(self._listed[key])


@dataclass(frozen=True)
class MVTecRoot(_ListedOnce):
    """An MVTec-layout dataset root as a :class:`TestSet`: each category's ``test/`` split
    (:func:`iter_samples`; a defect image without a mask is kept, ``mask_path`` None)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def __str__(self) -> str:
        return str(self.root)

    def categories(self, requested: Sequence[str] = ()) -> list[str]:
        """``requested``, or every category when empty; the root must be a folder."""
        if not self.root.is_dir():
            raise DZADInputError(self.root, "dataset root is not a folder")
        return list(requested) or list_categories(self.root)

    def _list(self, category: str, skip_bad: bool) -> list[Sample]:
        split = iter_samples(
            self.root, category, "test", skip_bad=skip_bad, allow_missing_masks=True
        )
        return list(split)


@dataclass(frozen=True)
class FolderSet(_ListedOnce):
    """A test set in anomalib's Folder layout, served as one category of MVTec-layout samples:
    the images directly in ``normal`` (label 0) and ``abnormal`` (label 1, defect = its folder's
    name), each abnormal image's mask in ``masks`` matched by file stem (``x.png`` or
    ``x_mask.png``, any image suffix). With ``masks`` None there are no masks (image metrics
    only); with ``masks`` given an abnormal image without one is bad input naming it.
    ``root`` (the folders' common parent) names the images in outputs; ``category`` is its name.
    A :class:`TestSet`.
    """

    normal: Path
    abnormal: Path
    masks: Path | None = None

    def __post_init__(self) -> None:
        for folder in (self.normal, self.abnormal, self.masks):
            if folder is not None and not folder.is_dir():
                raise DZADInputError(folder, "is not a folder")

    @property
    def root(self) -> Path:
        return Path(os.path.commonpath([self.normal.absolute(), self.abnormal.absolute()]))

    @property
    def category(self) -> str:
        return self.root.name or "folder"

    def __str__(self) -> str:
        masks = "" if self.masks is None else f", masks {self.masks}"
        return f"normal {self.normal}, abnormal {self.abnormal}{masks}"

    def _mask_index(self) -> dict[str, Path]:
        """Mask file by stem (``x`` and ``x_mask`` both give ``x``); ``.png`` wins a tie."""
        index: dict[str, Path] = {}
        for p in image_files(self.masks) if self.masks is not None else ():
            stem = p.stem.removesuffix("_mask")
            if stem not in index or p.suffix.lower() == ".png":
                index[stem] = p
        return index

    def categories(self, requested: Sequence[str] = ()) -> list[str]:
        """The one category (``requested`` may only name it)."""
        if list(requested) not in ([], [self.category]):
            raise ValueError(f"{self} is the one category {self.category!r}, not {requested}")
        return [self.category]

    def samples(self, category: str | None = None, skip_bad: bool = False) -> list[Sample]:
        """The test samples, normal images first (sorted names); an empty folder or a missing
        mask raises :class:`DZADInputError` (``skip_bad``: a missing mask is logged and skipped)."""
        self.categories([] if category is None else [category])
        return super().samples(self.category, skip_bad)

    def _list(self, category: str, skip_bad: bool) -> list[Sample]:
        normal, abnormal = image_files(self.normal), image_files(self.abnormal)
        for folder, files in ((self.normal, normal), (self.abnormal, abnormal)):
            if not files:
                raise DZADInputError(folder, "no image files in this folder")
        out = [Sample(p, self.category, "test", 0, GOOD, None) for p in normal]
        masks = self._mask_index()
        for path in abnormal:
            mask = masks.get(path.stem)
            if mask is None and self.masks is not None:
                expected = f"{path.stem}.png or {path.stem}_mask.png"
                fail_or_skip(
                    DZADInputError(path, f"no mask in {self.masks} (expected {expected})"), skip_bad
                )
                continue
            out.append(Sample(path, self.category, "test", 1, self.abnormal.name, mask))
        return out
