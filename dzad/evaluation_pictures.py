"""Per-image pictures and the HTML report of an evaluation (``dzad evaluate``).

Every test image gets the :mod:`dzad.run_panels` pictures (overlay, panel with the predicted region
in green and the ground truth in cyan, thumbnail; with ``save_masks`` the predicted mask), all on
the run's colour scale (a regime: its scored batch's), named ``<category>/test/<defect>/<file>``;
``report.html`` lists them with the metrics and the figures. :func:`dzad.evaluation.evaluate` and
:func:`dzad.regime_evaluation.evaluate_regime` call it when asked for pictures.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dzad.data.dataset import Sample
from dzad.decisions import NORMALISED_NOTE, Threshold, map_threshold
from dzad.errors import DZADInputError
from dzad.html_report import write_evaluate_report
from dzad.model import DZAD
from dzad.run_panels import FILES, Picture, RunPictures


class EvalPictures:
    """Collects each category's maps and rows, then writes pictures and ``report.html``.

    Pictures share a colour scale and map threshold per :meth:`new_scale` call: one for a
    per-image run (:meth:`calibrated`), one per scored batch in a regime. ``settings``: what
    ``report.html`` states about the decision and the maps; ``score_key``: the row's score the
    decision thresholds."""

    def __init__(
        self, root: Path, score_key: str, save_masks: bool, mask_threshold: int,
        settings: dict[str, str],
    ) -> None:  # fmt: skip
        self.root, self.score_key, self.save_masks = root, score_key, save_masks
        self.mask_threshold, self.settings = mask_threshold, settings
        self._runs: list[RunPictures] = []
        self._names: list[Path] = []

    @classmethod
    def calibrated(cls, model: DZAD, root: Path, rule: Threshold, save_masks: bool) -> EvalPictures:
        """Per-image (zero-shot) pictures: one scale from the checkpoint's calibrated map
        threshold; ``save_masks`` without one stops here, before anything is scored."""
        level, note = map_threshold(model)
        if save_masks and level is None:
            raise DZADInputError(root, f"--save-masks needs a calibrated map threshold: {note}")
        settings = {
            "decision": f"{rule.key} > {rule.value:.4g} (SOURCE-calibrated)",
            "normalised score": NORMALISED_NOTE,
            "heat maps": note,
        }
        pics = cls(root, rule.key, save_masks, model.cfg.data.mask_threshold, settings)
        pics.new_scale(level)
        return pics

    def new_scale(self, level: float | None) -> None:
        """The pictures added from now on share a new colour scale whose map threshold (the
        predicted region's, the masks') is ``level`` (None: no region)."""
        self._runs.append(RunPictures(level, self.mask_threshold))

    @contextlib.contextmanager
    def scratch(self, category: str) -> Iterator[Path]:
        """A temporary ``.npy`` path for one category's maps when they are not kept."""
        with tempfile.TemporaryDirectory(prefix="dzad-eval-") as tmp:
            yield Path(tmp) / f"{category}.npy"

    def add(self, samples: Sequence[Sample], rows: Sequence[dict[str, Any]], maps) -> None:
        """One category (a regime: one scored batch): ``maps`` ``(n, H, W)`` in ``rows`` /
        ``samples`` order, on the latest scale (:meth:`new_scale`)."""
        for i, (sample, row) in enumerate(zip(samples, rows, strict=True)):
            path = Path(sample.path)
            name = path.relative_to(self.root) if path.is_relative_to(self.root) else path.name
            pic = Picture(
                path,
                Path(name),
                self.score_key.replace("_", " "),
                row[self.score_key],
                row["normalised_score"],
                row["decision"],
                None if sample.mask_path is None else Path(sample.mask_path),
            )
            self._runs[-1].add(pic, np.asarray(maps[i]))
            self._names.append(Path(name))

    def finish(self, out: Path, rows: list[dict[str, Any]], result: dict[str, Any]) -> None:
        """Write the pictures, add their paths to ``rows``, write ``report.html``."""
        files = {}
        for run in self._runs:
            files.update(run.write(out, self.save_masks))
        for row, name in zip(rows, self._names, strict=True):
            row.update({k: files[name].get(k) for k in FILES})
        figures = [
            f"figures/{cat}_{kind}.png"
            for cat in result["categories"]
            for kind in ("roc", "pr", "heatmaps")
            if (out / "figures" / f"{cat}_{kind}.png").is_file()
        ]
        settings = {
            "data": str(self.root),
            **self.settings,
            "contours": "green: predicted region (map above threshold); cyan: ground truth",
        }
        write_evaluate_report(out, rows, result, figures, settings)
