"""Read any image or mask file the datasets contain into the project's tensor conventions.

Images become ``float32`` tensors ``(3, H, W)`` in ``[0, 1]``; masks become ``(1, H, W)`` float in
``{0, 1}``. Every failure (missing, zero-byte, truncated, not an image, unsupported pixel type) is a
:class:`~dzad.errors.DZADInputError` naming the file, never a silently wrong tensor.

Pixel types (choices written down so that results do not depend on a file's encoding):

- 8-bit grey ``L`` and bilevel ``1`` are replicated to three channels; CMYK/YCbCr/LAB become RGB.
- 16-bit grey (``I;16*``) and 32-bit integer ``I`` (how PIL opens 16-bit PNG/TIFF) are divided by
  65535 and clipped, so full scale is 1.0 whatever the bit depth.
- Alpha (``RGBA``, ``LA``, palette with transparency) is composited on **black**: a transparent
  pixel has no defined colour, and black makes the result independent of whatever is stored there.
- Palette images (``P``) use their palette colours. Palette *masks* are label maps instead: the
  index is the value (index 0 = background), as in VisA-style masks.
- Floating-point (``F``) images are rejected: their value range is not defined.

Large files are never decoded at full size when a target size is known: JPEG uses ``draft`` (DCT
scaling) and every format goes through ``resize(..., reducing_gap=2)`` (box reduction first).
EXIF orientation is applied (an image is scored as it is displayed); a multi-frame file (TIFF, GIF)
is warned about and its first frame used. Truncated files are detected because PIL's
``ImageFile.LOAD_TRUNCATED_IMAGES`` is left ``False`` and every image is fully decoded here.
"""

from __future__ import annotations

import contextlib
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from dzad.errors import DZADInputError

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm"}
)
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_ORIENTATION = 0x0112  # EXIF tag
_INT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_READ_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    zlib.error,
    Image.DecompressionBombError,
)

Size = int | tuple[int, int]


def _hw(size: Size) -> tuple[int, int]:
    """``int`` -> square; ``(H, W)`` tuple as is."""
    h, w = (size, size) if isinstance(size, int) else size
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {size!r}")
    return int(h), int(w)


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DZADInputError(path, "no such file")
    if path.stat().st_size == 0:
        raise DZADInputError(path, "empty file (0 bytes)")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise DZADInputError(path, "PIL LOAD_TRUNCATED_IMAGES is on; truncation cannot be detected")


def _transposed(im: Image.Image) -> bool:
    """Whether the EXIF orientation swaps width and height (orientations 5-8: a quarter turn).

    A PNG's eXIf chunk counts when it comes before the pixel data (PIL would decode the whole
    file to look further, which the header-only :func:`image_size` must not do)."""
    if im.format == "PNG" and "exif" not in im.info:
        return False
    return im.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """``path`` opened lazily: its header read, its pixels not yet decoded (closed on exit)."""
    _check_file(path)
    try:
        im = Image.open(path)
    except _READ_ERRORS as exc:
        raise DZADInputError(path, f"not a readable image ({exc})") from None
    with im:
        yield im


def _displayed_size(im: Image.Image, path: Path) -> tuple[int, int]:
    """Displayed ``(W, H)`` of an opened, not yet decoded image (header only)."""
    try:
        return im.size[::-1] if _transposed(im) else im.size
    except _READ_ERRORS as exc:
        raise DZADInputError(path, f"not a readable image ({exc})") from None


def _decoded(im: Image.Image, path: Path, draft_hw: tuple[int, int] | None) -> Image.Image:
    """Fully decode the opened ``im`` as it is displayed (EXIF orientation applied); ``draft_hw``
    (displayed ``(H, W)``) lets JPEG decode at a reduced scale >= it. A multi-frame file (TIFF,
    GIF, ...) is warned about once: its first frame is used."""
    try:
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            warnings.warn(f"{path}: {frames} frames; only frame 1 is used", stacklevel=3)
        if draft_hw is not None and im.format == "JPEG":
            h, w = draft_hw[::-1] if _transposed(im) else draft_hw
            im.draft(im.mode, (w, h))
        im.load()
        return ImageOps.exif_transpose(im)  # a copy, rotated/flipped as displayed
    except _READ_ERRORS as exc:
        raise DZADInputError(path, f"unreadable or truncated image ({exc})") from None


def open_image(path: str | Path, draft_hw: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode ``path`` as it is displayed (:func:`_decoded`)."""
    path = Path(path)
    with _opened(path) as im:
        return _decoded(im, path, draft_hw)


def image_size(path: str | Path) -> tuple[int, int]:
    """Displayed ``(W, H)`` from the file header alone (cheap; does not decode the pixels)."""
    path = Path(path)
    with _opened(path) as im:
        return _displayed_size(im, path)


def _to_display_mode(im: Image.Image, path: Path) -> Image.Image:
    """Reduce any PIL mode to ``L``, ``RGB`` or ``F`` (high bit depth scaled to [0, 1])."""
    if im.mode in _INT_MODES:
        arr = np.asarray(im, dtype=np.float32) / 65535.0
        return Image.fromarray(np.clip(arr, 0.0, 1.0))
    if im.mode == "F":
        raise DZADInputError(path, "floating-point images are not supported (value range unknown)")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    if im.mode == "1":
        return im.convert("L")
    return im if im.mode in ("L", "RGB") else im.convert("RGB")


def _target_hw(w: int, h: int, size: Size | None, max_side: int | None) -> tuple[int, int] | None:
    if size is not None:
        return _hw(size)
    if max_side is not None and max(w, h) > max_side:
        scale = max_side / max(w, h)
        return max(1, round(h * scale)), max(1, round(w * scale))
    return None


def pil_to_tensor(
    im: Image.Image, size: Size | None = None, resample: str = "bilinear"
) -> torch.Tensor:
    """A display-mode image (``L``, ``RGB``, or ``F`` in [0, 1]) -> ``(C, H, W)`` float32 in
    [0, 1] (C = 1 or 3), resized by PIL with ``resample`` (box reduction first): the one resize and
    conversion of image files and image arrays alike (``flows/pyfunc.py``)."""
    if size is not None:
        h, w = _hw(size)
        if im.size != (w, h):
            im = im.resize((w, h), RESAMPLE[resample], reducing_gap=2.0)
    arr = np.array(im, dtype=np.float32)  # a writable copy
    if im.mode != "F":
        arr = arr / 255.0
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def load_image(
    path: str | Path,
    size: Size | None = None,
    resample: str = "bilinear",
    max_side: int | None = None,
    *,
    draft: bool = True,
) -> torch.Tensor:
    """Read an image file as a ``(3, H, W)`` float32 tensor in ``[0, 1]``.

    ``size``: ``int`` (square) or ``(H, W)``; the image is resized to exactly that (aspect ratio not
    kept, as in the MVTec protocol). ``None`` keeps the native size, except that ``max_side`` (when
    given) shrinks larger images keeping the aspect ratio. ``draft`` False decodes JPEGs at full
    size (then the result equals :func:`pil_to_tensor` of the decoded pixels).
    """
    path = Path(path)
    with _opened(path) as opened:  # one open: the header gives the size, then the pixels decode
        w, h = _displayed_size(opened, path)
        target = _target_hw(w, h, size, max_side)
        im = _to_display_mode(_decoded(opened, path, target if draft else None), path)
    return pil_to_tensor(im, target, resample).expand(3, -1, -1).contiguous()


def mask_values(path: str | Path) -> np.ndarray:
    """Raw mask values ``(H, W)`` float32 on the 8-bit scale (16-bit divided by 257).

    Colour masks take the maximum over channels (a pure-blue mark still counts); palette masks use
    the index; alpha is ignored.
    """
    path = Path(path)
    im = open_image(path)
    if im.mode == "F":
        raise DZADInputError(path, "floating-point masks are not supported")
    if im.mode in _INT_MODES:
        return np.asarray(im, dtype=np.float32) / 257.0
    if im.mode == "1":
        return np.asarray(im.convert("L"), dtype=np.float32)
    if im.mode in ("L", "P"):
        return np.asarray(im, dtype=np.float32)
    if im.mode in ("LA", "La", "PA"):
        return np.asarray(im, dtype=np.float32)[..., 0]
    arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return arr.max(axis=-1)


def binarise(values: np.ndarray, threshold: int) -> np.ndarray:
    """``values > threshold`` as bool ``(H, W)``: 0 means "> 0", 127 means ">= 128"."""
    return values > threshold


def load_mask(path: str | Path, threshold: int = 0, size: Size | None = None) -> torch.Tensor:
    """Read a mask as ``(1, H, W)`` float in ``{0, 1}``: binarised first, then resized NEAREST."""
    binary = binarise(mask_values(path), threshold)
    if size is not None:
        h, w = _hw(size)
        if binary.shape != (h, w):
            im = Image.fromarray(binary.astype(np.uint8) * 255)
            binary = np.asarray(im.resize((w, h), Image.Resampling.NEAREST)) > 0
    return torch.from_numpy(binary.astype(np.float32)).unsqueeze(0)
