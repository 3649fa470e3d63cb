"""Heat-map images an inspector can read at a glance (``dzad score``, ``dzad evaluate``).

Every image of a run is drawn on one colour scale (:class:`MapScale`): values below the calibrated
map threshold are transparent, values from the threshold up to the run's highest map value go
through ``inferno`` with rising opacity, and a colour bar shows the scale. The predicted defect
region is where the map exceeds the threshold; it is drawn as a contour (green), the ground truth
(``dzad evaluate``) as a second contour (cyan).

:func:`draw` composes ``original | overlay | predicted region`` under a caption line (score,
normalised score, decision) with the colour bar at the right, and the overlay tile alone with the
same caption and bar. Drawing is PIL only (fast enough for one image per row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 256  # small inputs are enlarged so the caption and contours stay legible
MAX_ALPHA, MIN_ALPHA = 0.85, 0.35  # overlay opacity at the top of the scale / just above threshold
REGION, TRUTH = (0, 230, 0), (0, 230, 230)  # contour colours (RGB)
BAR_W, CAPTION_H = 70, 26


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
        """``(H, W)`` map -> RGB ``(H, W, 3)`` in [0, 1], opacity ``(H, W)`` (0 below threshold)."""
        from matplotlib import colormaps

        span = max(self.top - self.bottom, 1e-12)
        level = np.clip((m - self.bottom) / span, 0.0, 1.0)
        rgb = colormaps["inferno"](level)[..., :3]
        if self.threshold is None:
            return rgb, np.full(m.shape, 0.5)
        alpha = np.where(m > self.threshold, MIN_ALPHA + (MAX_ALPHA - MIN_ALPHA) * level, 0.0)
        return rgb, alpha


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


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size)


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` of the region's border ``(H, W)`` bool (max-pool dilation)."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    k = 2 * width + 1
    grown = torch.nn.functional.max_pool2d(t, k, stride=1, padding=width)[0, 0].numpy() > 0
    shrunk = -torch.nn.functional.max_pool2d(-t, k, stride=1, padding=width)[0, 0].numpy() > 0
    return grown & ~shrunk


def _draw_contour(img: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    width = max(1, round(min(mask.shape) / 200))
    img[_outline(mask, width)] = colour


def blend(image: np.ndarray, m: np.ndarray, scale: MapScale) -> np.ndarray:
    """Map ``(h, w)`` resized onto ``image`` ``(H, W, 3)`` in [0, 1] -> uint8 ``(H, W, 3)``."""
    rgb, alpha = scale.colours(resize_map(m, image.shape[:2]))
    mixed = (1 - alpha[..., None]) * image + alpha[..., None] * rgb
    return (np.clip(mixed, 0, 1) * 255).round().astype(np.uint8)


def _tiles(
    image: np.ndarray, m: np.ndarray, scale: MapScale
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Display-size original and overlay, uint8 ``(H, W, 3)``, and the map ``(H, W)`` resized."""
    hw = tile_size(*image.shape[:2])
    shown = np.asarray(
        Image.fromarray((image * 255).round().astype(np.uint8)).resize(hw[::-1], Image.BILINEAR)
    )
    return shown, blend(shown / 255.0, m, scale), resize_map(m, hw)


def colour_bar(scale: MapScale, height: int) -> Image.Image:
    """The run's colour scale as a vertical bar ``(height, BAR_W)`` with its end values."""
    from matplotlib import colormaps

    bar = Image.new("RGB", (BAR_W, height), "white")
    top, bottom = 14, height - 14
    ramp = colormaps["inferno"](np.linspace(1, 0, bottom - top))[:, :3]
    strip = (np.repeat(ramp[:, None, :], 14, axis=1) * 255).astype(np.uint8)
    bar.paste(Image.fromarray(strip), (4, top))
    draw, font = ImageDraw.Draw(bar), _font(10)
    draw.text((20, top - 2), f"{scale.top:.3g}", fill="black", font=font)
    label = "thr" if scale.threshold is not None else "min"
    draw.text((20, bottom - 22), f"{label}\n{scale.bottom:.3g}", fill="black", font=font)
    if scale.threshold is not None:
        draw.text((2, bottom + 1), "below: clear", fill="grey", font=_font(9))
    return bar


def _caption(text: str, anomalous: bool | None, width: int) -> Image.Image:
    strip = Image.new("RGB", (width, CAPTION_H), "white")
    colour = "black" if anomalous is None else ("#c00000" if anomalous else "#007000")
    draw, size = ImageDraw.Draw(strip), 14
    while size > 8 and draw.textlength(text, font=_font(size)) > width - 8:
        size -= 1  # narrow images: shrink the caption until it fits
    draw.text((4, 5), text, fill=colour, font=_font(size))
    return strip


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
    img.paste(_caption(caption, anomalous, width), (0, 0))
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
