"""The SOURCE images as training and calibration read them: random access by index
(:class:`ImageSource`), in memory when they fit."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset


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
