"""Image and mask reading: every pixel format, sizes, binarisation and every kind of bad file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from dzad.data.images import image_size, load_image, load_mask, mask_values
from dzad.errors import DZADInputError

RNG = np.random.default_rng(0)


def _rgb(h: int = 4, w: int = 5) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png48(path: Path, arr16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    h, w, _ = arr16.shape
    raw = b"".join(b"\x00" + arr16[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_lossless_rgb_is_exact(tmp_path, suffix):
    arr = _rgb()
    p = tmp_path / f"x{suffix}"
    Image.fromarray(arr).save(p)
    t = load_image(p)
    assert t.dtype == torch.float32 and t.shape == (3, 4, 5)
    torch.testing.assert_close(t, _chw(arr) / 255)


def test_grayscale_is_replicated(tmp_path):
    arr = RNG.integers(0, 256, (6, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "g.png")
    t = load_image(tmp_path / "g.png")
    assert t.shape == (3, 6, 3)
    for c in range(3):
        torch.testing.assert_close(t[c], torch.from_numpy(arr / 255).float())


def test_bilevel_image(tmp_path):
    Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1").save(tmp_path / "b.png")
    assert load_image(tmp_path / "b.png")[:, 0].tolist() == [[0.0, 1.0]] * 3


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grey_scaled_by_65535(tmp_path, suffix):
    arr = np.array([[0, 255, 256], [32768, 65000, 65535]], dtype=np.uint16)
    p = tmp_path / f"g16{suffix}"
    Image.fromarray(arr).save(p)
    t = load_image(p)
    torch.testing.assert_close(t[1], torch.from_numpy(arr / 65535).float())


def test_16bit_rgb_png(tmp_path):
    arr = RNG.integers(0, 65536, (3, 4, 3)).astype(np.uint16)
    _png48(tmp_path / "c48.png", arr)
    t = load_image(tmp_path / "c48.png")
    assert t.shape == (3, 3, 4)
    assert (t - _chw(arr) / 65535).abs().max() <= 1 / 255 + 1e-6


def test_rgba_is_composited_on_black(tmp_path):
    arr = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [255, 255, 255, 0]]], np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    t = load_image(tmp_path / "a.png")[:, 0]  # (3, 3)
    assert torch.allclose(t[:, 0], torch.tensor([200, 100, 50]) / 255)
    assert torch.allclose(t[:, 1], torch.tensor([200, 100, 50]) / 255 * 128 / 255, atol=1 / 255)
    assert t[:, 2].tolist() == [0.0, 0.0, 0.0]


def test_grey_with_alpha(tmp_path):
    Image.fromarray(np.array([[[100, 255], [100, 0]]], np.uint8), "LA").save(tmp_path / "la.png")
    t = load_image(tmp_path / "la.png")
    assert torch.allclose(t[:, 0, 0], torch.full((3,), 100 / 255)) and t[:, 0, 1].sum() == 0


def test_palette_uses_colours_and_transparency(tmp_path):
    im = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    im.putpalette([10, 20, 30, 200, 150, 100, 255, 255, 255] + [0] * (253 * 3))
    im.save(tmp_path / "p.png")
    t = load_image(tmp_path / "p.png")
    expected = torch.tensor([[10, 200, 255], [20, 150, 255], [30, 100, 255]]) / 255
    torch.testing.assert_close(t[:, 0], expected.float())
    im.save(tmp_path / "pt.png", transparency=2)
    assert load_image(tmp_path / "pt.png")[:, 0, 2].sum() == 0


def test_jpeg_close_to_source(tmp_path):
    arr = np.full((32, 32, 3), (120, 60, 200), np.uint8)
    Image.fromarray(arr).save(tmp_path / "j.jpg", quality=95)
    t = load_image(tmp_path / "j.jpg")
    assert (t - _chw(arr) / 255).abs().max() < 4 / 255


def test_resize_to_square_and_tuple(tmp_path):
    Image.fromarray(_rgb(30, 50)).save(tmp_path / "r.png")
    assert load_image(tmp_path / "r.png", 16).shape == (3, 16, 16)
    assert load_image(tmp_path / "r.png", (8, 12), resample="bicubic").shape == (3, 8, 12)
    assert load_image(tmp_path / "r.png", max_side=25).shape == (3, 15, 25)
    assert load_image(tmp_path / "r.png", max_side=100).shape == (3, 30, 50)
    with pytest.raises(ValueError):
        load_image(tmp_path / "r.png", 0)


def test_large_jpeg_is_decoded_reduced(tmp_path, monkeypatch):
    yy, xx = np.mgrid[0:1600, 0:2400]
    arr = np.stack([xx * 255 // 2400, yy * 255 // 1600, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=90)
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        calls.append(size)
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    t = load_image(tmp_path / "big.jpg", 64)
    assert calls == [(64, 64)]
    reference = torch.from_numpy(arr[12::25, 18::37][:64, :64] / 255).permute(2, 0, 1).float()
    assert t.shape == (3, 64, 64)
    assert (t[:2] - reference[:2]).abs().mean() < 0.03  # the two smooth ramps survive


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_load_image_opens_the_file_once(tmp_path, monkeypatch, suffix):
    """The header read for the size and the decode share one open (JPEG: draft still applied)."""
    Image.fromarray(_rgb(40, 60)).save(tmp_path / f"a{suffix}")
    opened, original = [], Image.open

    def spy(fp, *args, **kwargs):
        opened.append(Path(fp).name)
        return original(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spy)
    t = load_image(tmp_path / f"a{suffix}", 16)
    assert opened == [f"a{suffix}"] and t.shape == (3, 16, 16)


def test_image_size_reads_header(tmp_path):
    Image.fromarray(_rgb(7, 9)).save(tmp_path / "s.png")
    assert image_size(tmp_path / "s.png") == (9, 7)


def _truncated(tmp_path: Path, suffix: str) -> Path:
    p = tmp_path / f"full{suffix}"
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return cut


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_FILES = {
    "missing": lambda d: d / "missing.png",
    "zero-byte": lambda d: _write(d / "zero.png", b""),
    "text": lambda d: _write(d / "text.png", b"not an image"),
    "truncated-png": lambda d: _truncated(d, ".png"),
    "truncated-jpg": lambda d: _truncated(d, ".jpg"),
    "truncated-bmp": lambda d: _truncated(d, ".bmp"),
}


@pytest.mark.parametrize("make", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_files_raise_naming_the_file(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(DZADInputError) as err:
        load_image(path)
    assert err.value.path == path and str(path) in str(err.value)
    with pytest.raises(DZADInputError):
        load_mask(path)


def test_float_images_rejected(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DZADInputError, match="floating-point"):
        load_image(tmp_path / "f.tif")


@pytest.mark.parametrize(("threshold", "expected"), [(0, [0, 1, 1, 1, 1]), (127, [0, 0, 0, 1, 1])])
def test_mask_threshold(tmp_path, threshold, expected):
    Image.fromarray(np.array([[0, 1, 127, 128, 255]], np.uint8)).save(tmp_path / "m.png")
    m = load_mask(tmp_path / "m.png", threshold)
    assert m.shape == (1, 1, 5) and m[0, 0].tolist() == expected


def test_mask_formats(tmp_path):
    rgb = np.zeros((1, 3, 3), np.uint8)
    rgb[0, 1] = (0, 0, 255)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert load_mask(tmp_path / "c.png", 127)[0, 0].tolist() == [0, 1, 0]
    Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(tmp_path / "m16.png")
    assert load_mask(tmp_path / "m16.png", 127)[0, 0].tolist() == [0, 1, 1]
    pal = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    pal.putpalette([0, 0, 0] * 256)  # all black: the index, not the colour, is the label
    pal.save(tmp_path / "p.png")
    assert mask_values(tmp_path / "p.png").tolist() == [[0, 1, 2]]
    assert load_mask(tmp_path / "p.png")[0, 0].tolist() == [0, 1, 1]


def test_mask_resized_nearest_stays_binary(tmp_path):
    small = RNG.integers(0, 2, (4, 4)).astype(np.uint8) * 255
    Image.fromarray(small).save(tmp_path / "m.png")
    m = load_mask(tmp_path / "m.png", 0, 8)
    assert m.shape == (1, 8, 8)
    assert torch.equal(m[0], torch.from_numpy(np.kron(small > 0, np.ones((2, 2)))).float())
    Image.fromarray((RNG.random((37, 53)) > 0.7).astype(np.uint8) * 255).save(tmp_path / "o.png")
    assert set(load_mask(tmp_path / "o.png", 0, 16).unique().tolist()) <= {0.0, 1.0}
