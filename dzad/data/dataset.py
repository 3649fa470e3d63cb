"""MVTec-layout datasets: list the samples of a category and serve them as tensors.

Layout (one root holds many categories)::

    root/<category>/train/good/<name>.<ext>
    root/<category>/test/good/<name>.<ext>
    root/<category>/test/<defect>/<name>.<ext>
    root/<category>/ground_truth/<defect>/<name>_mask.png      (any image suffix is accepted)

A category without ``train/`` is valid (test-only). What an evaluation scores (an MVTec-layout
root or plain folders) is a :class:`dzad.data.test_sets.TestSet`.
Bad input -- a defect image without a mask, a mask whose size differs from its image, an unreadable
file, an empty category -- raises :class:`~dzad.errors.DZADInputError` naming the file; with
``skip_bad=True`` it is logged (``logging.warning``) and the sample is left out instead. With
``allow_missing_masks=True`` a defect image without a mask is kept with ``mask_path=None``
(image-level metrics only). A sample is never given a wrong label.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def image_files(folder: Path) -> list[Path]:
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


def fail_or_skip(err: DZADInputError, skip_bad: bool) -> None:
    """Raise ``err`` (bad input), or with ``skip_bad`` log it as skipped."""
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
            fail_or_skip(DZADInputError(defect_dir, "train/ may only hold good/ images"), skip_bad)
            continue
        for path in image_files(defect_dir):
            if defect == GOOD:
                yield Sample(path, category, split, 0, GOOD, None)
                continue
            mask = find_mask(root, category, defect, path)
            if mask is None and not allow_missing_masks:
                expected = root / category / "ground_truth" / defect / f"{path.stem}_mask.png"
                fail_or_skip(
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
        fail_or_skip(DZADInputError(cat_dir, "empty category: no images in train/ or test/"), skip_bad)
        return
    for sample in _split_samples(root, category, split, skip_bad, allow_missing_masks):
        if validate:
            try:
                check_sample(sample)
            except DZADInputError as err:
                fail_or_skip(err, skip_bad)
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
                    fail_or_skip(err, True)
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
