"""Heat-map images an inspector can read at a glance (``dzad score``, ``dzad evaluate``).

Every image of a run is drawn on one colour scale (:class:`MapScale`): values below the calibrated
map threshold are transparent, values from the threshold up to the run's highest map value go
through ``inferno`` with rising opacity, and a colour bar shows the scale. The predicted defect
region is where the map exceeds the threshold; it is drawn as a contour (green), the ground truth
(``dzad evaluate``) as a second contour (cyan).

:func:`draw` composes ``original | overlay | predicted region`` under a caption line (score,
normalised score, decision) with the colour bar at the right, and the overlay tile alone with the
same caption and bar. Drawing is PIL and numpy with everything shared by a run's pictures (colour
table, fonts, colour bar) made once, so a picture costs little more than its PNG encoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 256  # small inputs are enlarged so the caption and contours stay legible
MAX_ALPHA, MIN_ALPHA = 0.85, 0.35  # overlay opacity at the top of the scale / just above threshold
REGION, TRUTH = (0, 230, 0), (0, 230, 230)  # contour colours (RGB)
BAR_W, CAPTION_H = 70, 26


@cache
def inferno() -> np.ndarray:
    """matplotlib's ``inferno`` as a ``(256, 3)`` uint8 table (the colour map has 256 entries)."""
    from matplotlib import colormaps

    return (colormaps["inferno"](np.arange(256))[:, :3] * 255).round().astype(np.uint8)


def _inferno_of(level: np.ndarray) -> np.ndarray:
    """Levels in [0, 1] ``(...)`` -> uint8 RGB ``(..., 3)``, the entry matplotlib would pick."""
    return np.take(inferno(), np.minimum(level * 256, 255).astype(np.uint8), axis=0)


@dataclass(frozen=True)
class MapScale:
    """One colour scale for a whole run.

    ``threshold``: the calibrated map threshold (None when the checkpoint has none: the scale then
    spans ``low``..``top`` with nothing faded and no predicted region); ``top``: the run's highest
    map value; ``low``: the run's lowest (used only without a threshold).
    """

    threshold: float | None
    top: float
    low: float

    @classmethod
    def of_run(cls, threshold: float | None, low: float, high: float) -> MapScale:
        """The scale for maps whose values span ``low``..``high``; the top never below threshold."""
        top = high if threshold is None else max(high, threshold)
        return cls(threshold, top, low)

    @property
    def bottom(self) -> float:
        return self.low if self.threshold is None else self.threshold

    def colours(self, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(H, W)`` map -> uint8 RGB ``(H, W, 3)``, float32 opacity (0 below threshold)."""
        span = max(self.top - self.bottom, 1e-12)
        level = np.clip((m - self.bottom) / span, 0.0, 1.0).astype(np.float32)
        rgb = _inferno_of(level)
        if self.threshold is None:
            return rgb, np.full(m.shape, 0.5, np.float32)
        alpha = np.where(m > self.threshold, MIN_ALPHA + (MAX_ALPHA - MIN_ALPHA) * level, 0.0)
        return rgb, alpha.astype(np.float32)


def resize_map(m: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` map -> ``(H, W)`` (bilinear), the same interpolation for overlays and masks."""
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=hw, mode="bilinear")[0, 0].numpy()


def predicted_mask(m: np.ndarray, threshold: float, hw: tuple[int, int]) -> np.ndarray:
    """Binary predicted defect region ``(H, W)`` bool: the map resized to ``hw`` above threshold."""
    return resize_map(m, hw) > threshold


def tile_size(h: int, w: int) -> tuple[int, int]:
    """Display size ``(H, W)`` of an ``h x w`` image: short side at least :data:`MIN_TILE`."""
    f = max(1.0, MIN_TILE / min(h, w))
    return round(h * f), round(w * f)


@cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size)


def _grow(mask: np.ndarray, width: int) -> np.ndarray:
    """``(H, W)`` bool dilated by a ``(2 width + 1)`` square; edge pixels repeat past the border."""
    h, w = mask.shape
    padded = np.pad(mask, width, mode="edge")
    rows = padded[:, :w].copy()
    for k in range(1, 2 * width + 1):
        rows |= padded[:, k : k + w]
    out = rows[:h].copy()
    for k in range(1, 2 * width + 1):
        out |= rows[k : k + h]
    return out


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` of the region's border ``(H, W)`` bool (dilation minus erosion).

    Repeating the edge pixels keeps the image border from counting as a region border.
    """
    return _grow(mask, width) & _grow(~mask, width)


def _draw_contour(img: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    width = max(1, round(min(mask.shape) / 200))
    img[_outline(mask, width)] = colour


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _blend(shown: np.ndarray, up: np.ndarray, scale: MapScale) -> np.ndarray:
    """uint8 ``(H, W, 3)`` image and its map ``(H, W)`` at that size -> uint8 overlay."""
    rgb, alpha = scale.colours(up)
    mask = Image.fromarray((alpha * 255).round().astype(np.uint8))
    return np.asarray(Image.composite(Image.fromarray(rgb), Image.fromarray(shown), mask))


def blend(image: np.ndarray, m: np.ndarray, scale: MapScale) -> np.ndarray:
    """Map ``(h, w)`` resized onto ``image`` ``(H, W, 3)`` in [0, 1] -> uint8 ``(H, W, 3)``."""
    return _blend(_to_uint8(image), resize_map(m, image.shape[:2]), scale)


def _tiles(
    image: np.ndarray, m: np.ndarray, scale: MapScale
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Display-size original and overlay, uint8 ``(H, W, 3)``, and the map ``(H, W)`` resized.

    The overlay is blended at the image's own size, then both tiles are enlarged nearest-neighbour
    (each input pixel a block): 16x less blending for a 64 px image, and PNG then compresses the
    repeated rows and pixels to a tenth, at half the encoding time.
    """
    hw = tile_size(*image.shape[:2])
    native = _to_uint8(image)
    over = _blend(native, resize_map(m, native.shape[:2]), scale)

    def enlarge(tile: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(tile).resize(hw[::-1], Image.Resampling.NEAREST))

    return enlarge(native), enlarge(over), resize_map(m, hw)


@lru_cache(maxsize=8)  # a run's pictures share one scale and a few heights
def colour_bar(scale: MapScale, height: int) -> Image.Image:
    """The run's colour scale as a vertical bar ``(height, BAR_W)`` with its end values.

    Made once per scale and height (a run's pictures share it); callers paste it, never draw on it.
    """
    bar = Image.new("RGB", (BAR_W, height), "white")
    top, bottom = 14, height - 14
    ramp = _inferno_of(np.linspace(1, 0, bottom - top))
    strip = np.ascontiguousarray(np.repeat(ramp[:, None, :], 14, axis=1))
    bar.paste(Image.fromarray(strip), (4, top))
    draw, font = ImageDraw.Draw(bar), _font(10)
    draw.text((20, top - 2), f"{scale.top:.3g}", fill="black", font=font)
    label = "thr" if scale.threshold is not None else "min"
    draw.text((20, bottom - 22), f"{label}\n{scale.bottom:.3g}", fill="black", font=font)
    if scale.threshold is not None:
        draw.text((2, bottom + 1), "below: clear", fill="grey", font=_font(9))
    return bar


def _caption(img: Image.Image, text: str, anomalous: bool | None) -> None:
    """Write the caption line into the top :data:`CAPTION_H` rows of ``img`` (white there)."""
    colour = "black" if anomalous is None else ("#c00000" if anomalous else "#007000")
    draw, size = ImageDraw.Draw(img), 14
    while size > 8 and draw.textlength(text, font=_font(size)) > img.width - 8:
        size -= 1  # narrow images: shrink the caption until it fits
    draw.text((4, 5), text, fill=colour, font=_font(size))


def caption_text(name: str, score: float, normalised: float | None, decision: str) -> str:
    """``"<name> 0.532 | normalised 0.71 | ANOMALOUS"`` (normalised left out when None)."""
    parts = [f"{name} {score:.4g}"]
    if normalised is not None and not math.isnan(normalised):
        parts.append(f"normalised {normalised:.2f}")
    return " | ".join([*parts, decision.upper()])


def _assemble(tiles: list[np.ndarray], caption: str, anomalous: bool | None, scale) -> Image.Image:
    h = tiles[0].shape[0]
    gap = 4
    width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1) + BAR_W
    img = Image.new("RGB", (width, h + CAPTION_H), "white")
    _caption(img, caption, anomalous)
    x = 0
    for t in tiles:
        img.paste(Image.fromarray(t), (x, CAPTION_H))
        x += t.shape[1] + gap
    img.paste(colour_bar(scale, h), (width - BAR_W, CAPTION_H))
    return img


def draw(
    image: np.ndarray,
    m: np.ndarray,
    scale: MapScale,
    caption: str,
    anomalous: bool | None,
    truth: np.ndarray | None = None,
) -> tuple[Image.Image, Image.Image]:
    """(overlay, panel) of one image ``(H, W, 3)`` in [0, 1] and its map ``(h, w)``.

    The overlay is the overlay tile alone; the panel is ``original | overlay | predicted region``
    (green contour; ground truth ``(H', W')`` bool in cyan when given), the region tile left out
    when there is neither threshold nor truth. Both carry the caption and the colour bar.
    """
    shown, over, up = _tiles(image, m, scale)
    tiles = [shown, over]
    if scale.threshold is not None or truth is not None:
        region = shown.copy()
        if truth is not None:
            gt = resize_map(truth.astype(np.float32), up.shape) > 0.5
            _draw_contour(region, gt, TRUTH)
        if scale.threshold is not None:
            _draw_contour(region, up > scale.threshold, REGION)
        tiles.append(region)
    overlay = _assemble([over], caption, anomalous, scale)
    return overlay, _assemble(tiles, caption, anomalous, scale)
