"""The SOURCE images: which they are (:func:`source_normals`, :func:`source_labelled`, the one
reading of SOURCE datasets for training, calibration and the controls) and random access to them by
index (:class:`ImageSource`), in memory when they fit."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dzad.config import DataConfig, DatasetRef
from dzad.data.dataset import ImageDataset, Sample, collect_samples
from dzad.errors import DZADInputError


def _where(refs: Sequence[DatasetRef]) -> str:
    return str(refs[0].root) if refs else "sets.source"


def source_normals(refs: Sequence[DatasetRef], *, skip_bad: bool = False) -> list[Sample]:
    """The SOURCE normals (``train/good``) of each ref's categories (none listed: every category),
    in ref order: what eq. 8 trains on and the controls are fitted on. DZADInputError when there
    are none."""
    kw = {"skip_bad": skip_bad}
    normals = [s for r in refs for s in collect_samples(r.root, r.categories, ("train",), **kw)]
    if not normals:
        raise DZADInputError(_where(refs), "no SOURCE normal training images (train/good)")
    return normals


def source_labelled(
    refs: Sequence[DatasetRef], image_size: int, data_cfg: DataConfig
) -> tuple[ImageDataset, Tensor]:
    """The labelled SOURCE split (``test/`` of each ref's categories: normals and anomalies, masks
    optional) as ``(images, labels (n,))`` for the learned weighting and the prototype mode: SOURCE
    data, never a target's. DZADInputError when it is empty."""
    kw = {"skip_bad": data_cfg.skip_bad, "allow_missing_masks": True}
    test = [s for r in refs for s in collect_samples(r.root, r.categories, ("test",), **kw)]
    if not test:
        raise DZADInputError(_where(refs), "the labelled SOURCE split (test/) is empty")
    images = ImageDataset(test, image_size, data_cfg)  # skip_bad: bad files dropped here
    return images, torch.tensor([s.label for s in images.samples])


class ImageSource:
    """Random access to ``(3,H,W)`` images in [0,1] from a tensor ``(n,3,H,W)`` or a Dataset.

    Dataset items may be a tensor, a tuple (image first) or a dict with ``"image"``
    (``dzad.data.dataset.ImageDataset``). Held in memory when it fits ``max_mb``.
    """

    def __init__(self, images: Dataset | Tensor, max_mb: int = 2048) -> None:
        self.data = images
        first = self._item(0)
        if first.ndim != 3 or first.shape[0] != 3 or first.shape[1] != first.shape[2]:
            raise ValueError(f"training images must be square (3,H,W); got {tuple(first.shape)}")
        self.image_size = int(first.shape[-1])
        if not isinstance(images, Tensor) and len(self) * first.numel() * 4 <= max_mb * 2**20:
            self.data = torch.stack([self._item(i) for i in range(len(self))])

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def _item(self, i: int) -> Tensor:
        item = self.data[i]
        if isinstance(item, dict):
            item = item["image"]
        elif isinstance(item, (tuple, list)):
            item = item[0]
        return torch.as_tensor(item, dtype=torch.float32)

    def get(self, idx: Tensor) -> Tensor:
        """``(b,)`` indices -> ``(b,3,H,W)``."""
        if isinstance(self.data, Tensor):
            return self.data[idx].float()
        return torch.stack([self._item(int(i)) for i in idx])

    def batches(self, idx: Tensor, size: int) -> Iterator[Tensor]:
        for s in range(0, len(idx), size):
            yield self.get(idx[s : s + size])
