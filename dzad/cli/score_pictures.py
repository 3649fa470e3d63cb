"""The pictures and report of ``dzad score``: the run's thresholds, one picture per image.

:func:`run_pictures` reads the checkpoint's decision rule and map threshold
(:mod:`dzad.decisions`) and starts the run's :class:`dzad.run_panels.RunPictures`; :func:`picture`
describes one scored row; :func:`settings` is what the HTML report states about the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dzad.decisions import NORMALISED_NOTE, Threshold, decision_threshold, map_threshold
from dzad.errors import DZADInputError
from dzad.run_panels import Picture, RunPictures

PICTURES_OFF = "not drawn: rerun with --pictures for a heat-map overlay and panel per image"
SCORE_COLUMNS = ["path", "image_score", "detection_score", "decision", "normalised_score"]


def run_pictures(
    model, threshold: float | None, save_masks: bool, uri: str, draw: bool
) -> tuple[Threshold, RunPictures, str]:
    """(decision rule, picture collector (drawing pictures when ``draw``), map-threshold note);
    ``--save-masks`` needs a calibrated map threshold, so a checkpoint without one stops here,
    before anything is written."""
    level, note = map_threshold(model)
    if save_masks and level is None:
        raise DZADInputError(uri, f"--save-masks needs a calibrated map threshold: {note}")
    return decision_threshold(model, threshold), RunPictures(level, draw=draw), note


def picture(image: Path, name: Path, row: dict[str, Any], rule: Threshold) -> Picture:
    return Picture(
        image,
        name,
        rule.key.replace("_", " "),
        row[rule.key],
        row["normalised_score"],
        row["decision"],
    )


def settings(
    uri: str, threshold: str, rule: Threshold, map_note: str, pictures: bool
) -> dict[str, str]:
    """The run's settings as the HTML report lists them."""
    return {
        "model": uri,
        "decision": f"{rule.key} > {rule.value:.4g} (--threshold {threshold})",
        "normalised score": NORMALISED_NOTE,
        "heat maps": map_note,
        "pictures": "drawn (--pictures)" if pictures else PICTURES_OFF,
    }
