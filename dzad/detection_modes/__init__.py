"""Detection modes (eq. 10-12): one module each, looked up by ``detection.mode`` in :data:`MODES`.

A mode (:class:`~dzad.detection_modes.base.DetectionMode`) says which noise-feature passes it needs
beyond the SG-hint one, fits its state on SOURCE data on top of the shared statistics
(:func:`dzad.detection.calibrate`), scores, and saves / loads its state. A new mode is one module
plus one line here; the config accepts exactly the names of :data:`MODES`.
"""

from __future__ import annotations

from dzad.detection_modes.base import DetectionMode, FeaturesOf, ModeSource
from dzad.detection_modes.contrast import ContrastMode
from dzad.detection_modes.prototype import PrototypeMode
from dzad.detection_modes.self_mode import SelfMode

MODES: dict[str, DetectionMode] = {
    "self": SelfMode(),
    "contrast": ContrastMode(),
    "prototype": PrototypeMode(),
}


def get_mode(name: str) -> DetectionMode:
    """The registered mode ``name``; ValueError naming the known ones otherwise."""
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown detection mode {name!r}; known: {sorted(MODES)}") from None


__all__ = ["MODES", "DetectionMode", "FeaturesOf", "ModeSource", "get_mode"]
