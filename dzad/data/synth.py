"""Synthetic two-family anomaly dataset in MVTec layout (numpy + PIL only, deterministic per seed).

``dest/<family>/<category>/...``; the families share no category, so "train on one family, test on
the other" is a true cross-dataset zero-shot check that runs offline:

- ``textures``: ``weave`` (fabric), ``grain`` (wood), ``mesh`` (perforated metal) -- full-frame
  patterns with random phase, rotation and frequency.
- ``objects``: ``washer``, ``nut``, ``chip`` -- one centred part with random pose on a background.

Every image gets random lighting (gain, gradient, tint) and sensor noise, so normal images differ
and mean intensity is no giveaway. Defects: ``scratch`` (thin curved line), ``hole`` (dark irregular
blob), ``stain`` (translucent colour blotch), ``contamination`` (small foreign particles) and, for
objects, ``missing`` (a chunk of the part removed, background shows through). Scratches, stains and
particles are brighter or darker at random, so defects do not shift the brightness one way. The mask
is exactly the set of pixels whose 8-bit value the defect changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dzad.config import SynthConfig
from dzad.io_utils import atomic_dir, atomic_write_text

FAMILIES: dict[str, tuple[str, ...]] = {
    "textures": ("weave", "grain", "mesh"),
    "objects": ("washer", "nut", "chip"),
}
DEFECTS: dict[str, tuple[str, ...]] = {
    "textures": ("scratch", "hole", "stain", "contamination"),
    "objects": ("scratch", "hole", "stain", "missing", "contamination"),
}
_SPLIT_CODE = {"train": 0, "test_good": 1, "test_defect": 2}


@dataclass
class Scene:
    """Layers of one rendered image, all ``(S, S, 3)`` float (``alpha``: ``(S, S)`` or ``None``)."""

    bg: np.ndarray
    fg: np.ndarray | None
    alpha: np.ndarray | None
    light: np.ndarray
    noise: np.ndarray
    centre: tuple[float, float]  # object centre (y, x) in pixels
    extent: float  # object radius in pixels

    def render(self, cut: np.ndarray | None = None) -> np.ndarray:
        """``(S, S, 3)`` float image; ``cut`` ``(S, S)`` in [0, 1] removes part of the object."""
        base = self.bg
        if self.fg is not None and self.alpha is not None:
            a = self.alpha if cut is None else self.alpha * (1.0 - cut)
            base = self.bg * (1.0 - a[..., None]) + self.fg * a[..., None]
        return np.clip(base * self.light + self.noise, 0.0, 1.0)


def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    return yy + 0.5, xx + 0.5


def _rotate(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, theta: float):
    c, s = np.cos(theta), np.sin(theta)
    dy, dx = yy - cy, xx - cx
    return c * dy - s * dx, s * dy + c * dx


def _smooth_field(rng: np.random.Generator, s: int, cells: int) -> np.ndarray:
    """Smooth random field ``(S, S)`` in about [-1, 1] (bicubic upsampling of a coarse grid)."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((s, s), Image.Resampling.BICUBIC))


def _lighting(rng: np.random.Generator, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image gain, gradient and tint ``(S, S, 3)`` plus sensor noise ``(S, S, 3)``."""
    yy, xx = _grid(s)
    gain = rng.uniform(0.82, 1.18)
    gy, gx = rng.uniform(-0.15, 0.15, 2)
    tint = 1.0 + rng.uniform(-0.04, 0.04, 3)
    light = (gain + gy * (yy / s - 0.5) + gx * (xx / s - 0.5))[..., None] * tint
    noise = rng.normal(0.0, rng.uniform(0.008, 0.02), (s, s, 3))
    return light.astype(np.float32), noise.astype(np.float32)


def _colour(rng: np.random.Generator, rgb: Sequence[float], jitter: float = 0.04) -> np.ndarray:
    return np.clip(np.asarray(rgb) + rng.uniform(-jitter, jitter, 3), 0, 1).astype(np.float32)


def _weave(rng: np.random.Generator, s: int) -> np.ndarray:
    yy, xx = _grid(s)
    u, v = _rotate(yy, xx, s / 2, s / 2, rng.uniform(-0.2, 0.2))
    f = rng.uniform(8.0, 11.0) / s
    a = np.sin(2 * np.pi * f * u + rng.uniform(0, 2 * np.pi))
    b = np.sin(2 * np.pi * f * v + rng.uniform(0, 2 * np.pi))
    over = np.sin(np.pi * f * u + rng.uniform(0, 2 * np.pi)) * np.sin(np.pi * f * v) > 0
    thread = np.where(over, np.abs(a), np.abs(b))
    return (0.55 + 0.4 * thread)[..., None] * _colour(rng, (0.78, 0.68, 0.52))


def _grain(rng: np.random.Generator, s: int) -> np.ndarray:
    yy, xx = _grid(s)
    u, _ = _rotate(yy, xx, s / 2, s / 2, rng.uniform(-0.3, 0.3))
    warp = _smooth_field(rng, s, 5)
    rings = np.sin(2 * np.pi * (rng.uniform(5, 8) * u / s + 0.6 * warp) + rng.uniform(0, 2 * np.pi))
    fine = 0.04 * _smooth_field(rng, s, 24)
    return (0.8 + 0.18 * rings + fine)[..., None] * _colour(rng, (0.66, 0.45, 0.28))


def _mesh(rng: np.random.Generator, s: int) -> np.ndarray:
    yy, xx = _grid(s)
    u, v = _rotate(yy, xx, s / 2, s / 2, rng.uniform(-0.15, 0.15))
    period = s / rng.uniform(7.0, 9.0)
    du = (u + rng.uniform(0, period)) % period - period / 2
    dv = (v + rng.uniform(0, period)) % period - period / 2
    d = np.hypot(du, dv) - period * rng.uniform(0.26, 0.32)
    hole = np.clip(0.5 - d, 0, 1)[..., None]
    metal = _colour(rng, (0.62, 0.64, 0.68)) * (0.9 + 0.1 * _smooth_field(rng, s, 4))[..., None]
    return metal * (1 - hole) + 0.12 * hole


def _texture_scene(render: Callable, rng: np.random.Generator, s: int) -> Scene:
    bg = render(rng, s).astype(np.float32)
    light, noise = _lighting(rng, s)
    return Scene(bg, None, None, light, noise, (s / 2, s / 2), s / 2)


def _object_scene(category: str, rng: np.random.Generator, s: int) -> Scene:
    """Background and one part with random pose; ``alpha`` is the anti-aliased coverage."""
    yy, xx = _grid(s)
    cy, cx = s * (0.5 + rng.uniform(-0.04, 0.04, 2))
    theta = rng.uniform(0, 2 * np.pi)
    u, v = _rotate(yy, xx, cy, cx, theta)
    r = np.hypot(u, v)
    ang = np.arctan2(u, v)
    shade = 0.85 + 0.12 * np.cos(2 * ang)  # anisotropic reflection of a turned metal surface
    if category == "washer":
        outer, inner = s * rng.uniform(0.31, 0.35), s * rng.uniform(0.12, 0.15)
        sdf = np.maximum(r - outer, inner - r)
        fg = shade[..., None] * _colour(rng, (0.72, 0.72, 0.74))
        bg = np.broadcast_to(_colour(rng, (0.22, 0.22, 0.25)), (s, s, 3))
        extent = outer
    elif category == "nut":
        circum = s * rng.uniform(0.29, 0.33)
        sector = (ang % (np.pi / 3)) - np.pi / 6
        hexagon = r * np.cos(sector) - circum * np.cos(np.pi / 6)
        sdf = np.maximum(hexagon, s * 0.12 - r)
        fg = (0.8 + 0.2 * np.cos(sector * 3))[..., None] * _colour(rng, (0.74, 0.6, 0.32))
        bg = np.broadcast_to(_colour(rng, (0.7, 0.7, 0.68)), (s, s, 3))
        extent = circum
    else:  # chip: dark body, silver pins on two sides, pin-1 dot, on a green board
        u, v = _rotate(yy, xx, cy, cx, rng.uniform(-0.08, 0.08))
        hw, hh = s * rng.uniform(0.2, 0.23), s * rng.uniform(0.15, 0.17)
        body = np.maximum(np.abs(v) - hw, np.abs(u) - hh)
        pitch = 2 * hw / 6
        pin_v = np.abs((v + hw) % pitch - pitch / 2) - pitch * 0.22
        pins = np.maximum(
            np.maximum(pin_v, np.abs(v) - hw), np.abs(np.abs(u) - hh - s * 0.04) - s * 0.04
        )
        sdf = np.minimum(body, pins)
        dot = np.hypot(u + hh * 0.6, v + hw * 0.75) < s * 0.025
        fg = np.where((body <= 0)[..., None], _colour(rng, (0.13, 0.13, 0.15), 0.02), 0.75)
        fg = np.where(dot[..., None], 0.45, fg)
        bg = np.broadcast_to(_colour(rng, (0.2, 0.42, 0.24)), (s, s, 3))
        extent = hw
    alpha = np.clip(0.5 - sdf, 0, 1).astype(np.float32)
    light, noise = _lighting(rng, s)
    return Scene(
        np.array(bg, np.float32), fg.astype(np.float32), alpha, light, noise, (cy, cx), extent
    )


_TEXTURES = {"weave": _weave, "grain": _grain, "mesh": _mesh}


def make_scene(family: str, category: str, rng: np.random.Generator, size: int) -> Scene:
    if family == "textures":
        return _texture_scene(_TEXTURES[category], rng, size)
    return _object_scene(category, rng, size)


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def _point(rng: np.random.Generator, scene: Scene, s: int) -> tuple[float, float]:
    """A random defect centre: on the part (objects) or away from the border (textures)."""
    if scene.alpha is not None:
        ys, xs = np.nonzero(scene.alpha > 0.9)
        i = rng.integers(len(ys))
        return float(ys[i]) + 0.5, float(xs[i]) + 0.5
    return tuple(float(v) for v in rng.uniform(0.15 * s, 0.85 * s, 2))


def _blob(rng: np.random.Generator, s: int, centre: tuple[float, float], r0: float) -> np.ndarray:
    """Irregular filled shape ``(S, S)`` bool: a circle with a random low-order wobbly border."""
    yy, xx = _grid(s)
    dy, dx = yy - centre[0], xx - centre[1]
    phi = np.arctan2(dy, dx)
    wobble = sum(
        rng.uniform(0, 0.2) * np.sin(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)
    )
    return np.hypot(dy, dx) <= r0 * (1 + wobble)


def _on_part(scene: Scene, cov: np.ndarray) -> np.ndarray:
    return cov if scene.alpha is None else cov * (scene.alpha > 0.5)


def _bright_or_dark(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Target values for a defect: clearly brighter or clearly darker than ``x`` (50/50)."""
    return (
        x + (1 - x) * rng.uniform(0.45, 0.7) if rng.random() < 0.5 else x * rng.uniform(0.2, 0.45)
    )


def _scratch(rng: np.random.Generator, x: np.ndarray, scene: Scene) -> np.ndarray:
    s = x.shape[0]
    p0 = np.array(_point(rng, scene, s))
    theta, length = rng.uniform(0, 2 * np.pi), s * rng.uniform(0.18, 0.4)
    d = np.array([np.sin(theta), np.cos(theta)])
    ctrl = p0 + d * length / 2 + np.array([-d[1], d[0]]) * length * rng.uniform(-0.2, 0.2)
    t = np.linspace(0, 1, 64)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t**2 * (p0 + d * length)
    yy, xx = _grid(s)
    dist = np.min(np.hypot(yy[..., None] - pts[:, 0], xx[..., None] - pts[:, 1]), axis=-1)
    cov = _on_part(scene, np.clip(rng.uniform(0.5, 1.1) + 0.5 - dist, 0, 1))[..., None]
    return x * (1 - cov) + _bright_or_dark(rng, x) * cov


def _hole(rng: np.random.Generator, x: np.ndarray, scene: Scene) -> np.ndarray:
    s = x.shape[0]
    centre = _point(rng, scene, s)
    cov = _on_part(scene, _blob(rng, s, centre, s * rng.uniform(0.03, 0.06)))[..., None]
    dark = rng.uniform(0.03, 0.12) + rng.normal(0, 0.01, x.shape)
    return x * (1 - cov) + dark * cov


def _stain(rng: np.random.Generator, x: np.ndarray, scene: Scene) -> np.ndarray:
    s = x.shape[0]
    centre = _point(rng, scene, s)
    cov = _on_part(scene, _blob(rng, s, centre, s * rng.uniform(0.06, 0.11)))[..., None]
    tint = rng.uniform(0.6, 1.0, 3) if rng.random() < 0.5 else rng.uniform(0.0, 0.3, 3)
    opacity = rng.uniform(0.35, 0.6)
    return x * (1 - opacity * cov) + tint * opacity * cov


def _contamination(rng: np.random.Generator, x: np.ndarray, scene: Scene) -> np.ndarray:
    s = x.shape[0]
    cy, cx = _point(rng, scene, s)
    yy, xx = _grid(s)
    out = x.copy()
    for _ in range(int(rng.integers(3, 9))):
        py, px = cy + rng.normal(0, 0.05 * s), cx + rng.normal(0, 0.05 * s)
        cov = np.clip(rng.uniform(0.7, 2.0) + 0.5 - np.hypot(yy - py, xx - px), 0, 1)[..., None]
        colour = rng.uniform(0.75, 1.0, 3) if rng.random() < 0.5 else rng.uniform(0.0, 0.2, 3)
        out = out * (1 - cov) + colour * cov
    return out


def _missing(rng: np.random.Generator, x: np.ndarray, scene: Scene) -> np.ndarray:
    s = x.shape[0]
    phi = rng.uniform(0, 2 * np.pi)
    rad = scene.extent * rng.uniform(0.85, 1.0)
    centre = (scene.centre[0] + rad * np.sin(phi), scene.centre[1] + rad * np.cos(phi))
    cut = _blob(rng, s, centre, scene.extent * rng.uniform(0.25, 0.4)).astype(np.float32)
    return scene.render(cut)


_DEFECT_FNS = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "contamination": _contamination,
    "missing": _missing,
}


def render_sample(
    family: str, category: str, size: int, rng: np.random.Generator, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(clean, image, mask)``: ``(S,S,3)`` uint8 twice and ``(S,S)`` bool.

    ``mask`` is exactly ``image != clean`` in any channel (empty when ``defect`` is ``None``).
    A defect that would change fewer than ``max(6, S*S/1000)`` pixels is drawn again.
    """
    scene = make_scene(family, category, rng, size)
    clean = _to_u8(scene.render())
    if defect is None:
        return clean, clean, np.zeros((size, size), bool)
    min_pixels = max(6, size * size // 1000)
    for _ in range(50):
        image = _to_u8(_DEFECT_FNS[defect](rng, clean.astype(np.float32) / 255.0, scene))
        mask = (image != clean).any(axis=-1)
        if mask.sum() >= min_pixels:
            return clean, image, mask
    raise RuntimeError(f"could not place a visible {defect} on {family}/{category} at size {size}")


def _save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")


def _write_category(
    folder: Path, family: str, category: str, seed: int, size: int, counts: dict[str, int]
) -> None:
    fi, ci = list(FAMILIES).index(family), FAMILIES[family].index(category)

    def rng(split: str, i: int) -> np.random.Generator:
        return np.random.default_rng([seed, fi, ci, _SPLIT_CODE[split], i])

    for i in range(counts["train"]):
        _save_png(
            folder / "train/good" / f"{i:03d}.png",
            render_sample(family, category, size, rng("train", i))[1],
        )
    for i in range(counts["test_good"]):
        _save_png(
            folder / "test/good" / f"{i:03d}.png",
            render_sample(family, category, size, rng("test_good", i))[1],
        )
    defects = DEFECTS[family]
    for i in range(counts["test_defect"]):
        defect, k = defects[i % len(defects)], i // len(defects)
        _, image, mask = render_sample(family, category, size, rng("test_defect", i), defect)
        _save_png(folder / "test" / defect / f"{k:03d}.png", image)
        _save_png(
            folder / "ground_truth" / defect / f"{k:03d}_mask.png", mask.astype(np.uint8) * 255
        )


def generate(
    dest: str | Path,
    seed: int = SynthConfig.seed,
    size: int = SynthConfig.size,
    n_train: int = SynthConfig.n_train,
    n_test_good: int = SynthConfig.n_test_good,
    n_test_defect: int = SynthConfig.n_test_defect,
    families: Sequence[str] = SynthConfig.families,
) -> dict[str, list[str]]:
    """Write ``dest/<family>/<category>/`` for every category of ``families``; returns their names.

    Each category folder is built under a temporary name and swapped in whole (an interrupted run
    leaves the previous copy). Byte-identical output for the same arguments; image ``i`` depends
    only on (seed, family, category, split, i), not on the other counts.
    """
    dest = Path(dest)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown synthetic families {unknown}; known: {sorted(FAMILIES)}")
    if size < 32:
        raise ValueError(f"synthetic images need size >= 32, got {size}")
    counts = {"train": n_train, "test_good": n_test_good, "test_defect": n_test_defect}
    if min(counts.values()) < 0:
        raise ValueError(f"image counts must be >= 0, got {counts}")
    written: dict[str, list[str]] = {}
    for family in families:
        for category in FAMILIES[family]:
            with atomic_dir(dest / family / category) as tmp:
                _write_category(tmp, family, category, seed, size, counts)
        written[family] = list(FAMILIES[family])
    params = {"seed": seed, "size": size, **counts, "families": list(families)}
    atomic_write_text(dest / "synth.json", json.dumps(params, indent=2, sort_keys=True) + "\n")
    return written
