"""MVTec-layout datasets: list the samples of a category and serve them as tensors.

Layout (one root holds many categories)::

    root/<category>/train/good/<name>.<ext>
    root/<category>/test/good/<name>.<ext>
    root/<category>/test/<defect>/<name>.<ext>
    root/<category>/ground_truth/<defect>/<name>_mask.png      (any image suffix is accepted)

A category without ``train/`` is valid (test-only). What an evaluation scores is a :class:`TestSet`:
an MVTec-layout root (:class:`MVTecRoot`, each category's ``test/`` split) or a plain folder layout
(:class:`FolderSet`, anomalib's Folder: normal / abnormal / masks folders, one category).
Bad input -- a defect image without a mask, a mask whose size differs from its image, an unreadable
file, an empty category -- raises :class:`~dzad.errors.DZADInputError` naming the file; with
``skip_bad=True`` it is logged (``logging.warning``) and the sample is left out instead. With
``allow_missing_masks=True`` a defect image without a mask is kept with ``mask_path=None``
(image-level metrics only). A sample is never given a wrong label.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from dzad.config import DataConfig
from dzad.data.images import IMAGE_SUFFIXES, image_size, load_image, load_mask
from dzad.errors import DZADInputError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One image of an MVTec-layout dataset.

    ``mask_path`` is ``None`` for good images and, with ``allow_missing_masks``, for defect images
    whose mask is missing.
    """

    path: Path
    category: str
    split: str  # "train" | "test"
    label: int  # 0 good, 1 defect
    defect: str  # "good" or the defect folder name
    mask_path: Path | None


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted; hidden files skipped, other files warned of."""
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(p)
        else:
            log.warning("%s: ignored (not an image file name)", p)
    return files


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_categories(root: str | Path) -> list[str]:
    """Sorted names of the category folders under ``root`` (those with ``train/`` or ``test/``)."""
    root = Path(root)
    if not root.is_dir():
        raise DZADInputError(root, "dataset root is not a folder")
    cats = [p.name for p in _subdirs(root) if any((p / s).is_dir() for s in SPLITS)]
    if not cats:
        raise DZADInputError(root, "no category folders (expected <category>/train or /test)")
    return cats


def find_mask(root: Path, category: str, defect: str, image: Path) -> Path | None:
    """``ground_truth/<defect>/<stem>_mask.*`` for ``image`` (``.png`` preferred), or ``None``."""
    folder = root / category / "ground_truth" / defect
    png = folder / f"{image.stem}_mask.png"
    if png.is_file():
        return png
    if folder.is_dir():
        for p in sorted(folder.glob(f"{image.stem}_mask.*")):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                return p
    return None


def check_sample(sample: Sample) -> None:
    """Header-only checks (cheap): the image is readable and its mask, if any, has the same size."""
    size = image_size(sample.path)
    if sample.mask_path is not None:
        msize = image_size(sample.mask_path)
        if msize != size:
            raise DZADInputError(
                sample.mask_path, f"mask size {msize} differs from image {sample.path} size {size}"
            )


def _fail(err: DZADInputError, skip_bad: bool) -> None:
    if not skip_bad:
        raise err
    log.warning("skipped: %s", err)


def _split_samples(
    root: Path, category: str, split: str, skip_bad: bool, allow_missing_masks: bool
) -> Iterator[Sample]:
    split_dir = root / category / split
    if not split_dir.is_dir():
        return
    for defect_dir in _subdirs(split_dir):
        defect = defect_dir.name
        if split == "train" and defect != GOOD:
            _fail(DZADInputError(defect_dir, "train/ may only hold good/ images"), skip_bad)
            continue
        for path in _image_files(defect_dir):
            if defect == GOOD:
                yield Sample(path, category, split, 0, GOOD, None)
                continue
            mask = find_mask(root, category, defect, path)
            if mask is None and not allow_missing_masks:
                expected = root / category / "ground_truth" / defect / f"{path.stem}_mask.png"
                _fail(
                    DZADInputError(path, f"defect image has no mask (expected {expected})"),
                    skip_bad,
                )
                continue
            yield Sample(path, category, split, 1, defect, mask)


def _has_images(root: Path, category: str) -> bool:
    for split in SPLITS:
        split_dir = root / category / split
        if split_dir.is_dir() and any(
            p.suffix.lower() in IMAGE_SUFFIXES for d in _subdirs(split_dir) for p in d.iterdir()
        ):
            return True
    return False


def iter_samples(
    root: str | Path,
    category: str,
    split: str,
    *,
    skip_bad: bool = False,
    validate: bool = False,
    allow_missing_masks: bool = False,
) -> Iterator[Sample]:
    """Yield the samples of ``root/category/split`` in sorted order (defect folders, then names).

    ``validate`` adds :func:`check_sample` (header reads) for every sample. Raises
    :class:`DZADInputError` on bad input unless ``skip_bad``; ``allow_missing_masks`` keeps a
    defect image without a mask (``mask_path=None``) instead of treating it as bad input.
    """
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cat_dir = root / category
    if not cat_dir.is_dir():
        raise DZADInputError(cat_dir, "category folder does not exist")
    if not _has_images(root, category):
        _fail(DZADInputError(cat_dir, "empty category: no images in train/ or test/"), skip_bad)
        return
    for sample in _split_samples(root, category, split, skip_bad, allow_missing_masks):
        if validate:
            try:
                check_sample(sample)
            except DZADInputError as err:
                _fail(err, skip_bad)
                continue
        yield sample


def collect_samples(
    root: str | Path,
    categories: Sequence[str] = (),
    splits: Sequence[str] = SPLITS,
    *,
    skip_bad: bool = False,
    validate: bool = False,
    allow_missing_masks: bool = False,
) -> list[Sample]:
    """All samples of ``categories`` (empty = every category) and ``splits`` as one list."""
    cats = list(categories) or list_categories(root)
    kwargs = {
        "skip_bad": skip_bad,
        "validate": validate,
        "allow_missing_masks": allow_missing_masks,
    }
    return [s for c in cats for sp in splits for s in iter_samples(root, c, sp, **kwargs)]


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
        for p in _image_files(self.masks) if self.masks is not None else ():
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
        normal, abnormal = _image_files(self.normal), _image_files(self.abnormal)
        for folder, files in ((self.normal, normal), (self.abnormal, abnormal)):
            if not files:
                raise DZADInputError(folder, "no image files in this folder")
        out = [Sample(p, self.category, "test", 0, GOOD, None) for p in normal]
        masks = self._mask_index()
        for path in abnormal:
            mask = masks.get(path.stem)
            if mask is None and self.masks is not None:
                expected = f"{path.stem}.png or {path.stem}_mask.png"
                _fail(
                    DZADInputError(path, f"no mask in {self.masks} (expected {expected})"), skip_bad
                )
                continue
            out.append(Sample(path, self.category, "test", 1, self.abnormal.name, mask))
        return out


class ImageDataset(torch.utils.data.Dataset):
    """Samples as tensors at a fixed size ``S``.

    Item: ``dict(image=(3,S,S) float [0,1], mask=(1,S,S) float {0,1}, label=int, path=str,
    category=str, defect=str)``; the mask is zeros when ``mask_path`` is None (good images, or a
    defect image without a mask: check ``Sample.mask_path`` before using it for pixel metrics).
    Mask and image sizes are checked (header read) when an item is loaded. With
    ``data_cfg.skip_bad`` the samples are checked once here and bad ones are logged and dropped (a
    file truncated after its header still fails when loaded).
    """

    def __init__(self, samples: Sequence[Sample], image_size: int, data_cfg: DataConfig) -> None:
        self.image_size = int(image_size)
        self.cfg = data_cfg
        kept = []
        for s in samples:
            if data_cfg.skip_bad:
                try:
                    check_sample(s)
                except DZADInputError as err:
                    _fail(err, True)
                    continue
            kept.append(s)
        self.samples: list[Sample] = kept

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        check_sample(s)
        size = self.image_size
        image = load_image(s.path, size, self.cfg.resample)
        if s.mask_path is None:
            mask = torch.zeros(1, size, size)
        else:
            mask = load_mask(s.mask_path, self.cfg.mask_threshold, size)
        return {
            "image": image,
            "mask": mask,
            "label": s.label,
            "path": str(s.path),
            "category": s.category,
            "defect": s.defect,
        }
