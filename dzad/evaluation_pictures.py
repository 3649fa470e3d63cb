"""Per-image pictures and the HTML report of an evaluation (``dzad evaluate``).

Every test image gets the :mod:`dzad.run_panels` pictures (overlay, panel with the predicted region
in green and the ground truth in cyan, thumbnail; with ``save_masks`` the predicted mask), all on
the run's colour scale, named ``<category>/test/<defect>/<file>``; ``report.html`` lists them with
the metrics and the figures. :func:`dzad.evaluation.evaluate` calls it when asked for pictures.
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
    """Collects each category's maps and rows, then writes pictures and ``report.html``."""

    def __init__(self, model: DZAD, root: Path, rule: Threshold, save_masks: bool) -> None:
        level, self.note = map_threshold(model)
        if save_masks and level is None:
            raise DZADInputError(
                root, f"--save-masks needs a calibrated map threshold: {self.note}"
            )
        self.root, self.rule, self.save_masks = root, rule, save_masks
        self.pictures = RunPictures(level, model.cfg.data.mask_threshold)
        self._names: list[Path] = []

    @contextlib.contextmanager
    def scratch(self, category: str) -> Iterator[Path]:
        """A temporary ``.npy`` path for one category's maps when they are not kept."""
        with tempfile.TemporaryDirectory(prefix="dzad-eval-") as tmp:
            yield Path(tmp) / f"{category}.npy"

    def add(self, samples: Sequence[Sample], rows: Sequence[dict[str, Any]], maps) -> None:
        """One category: ``maps`` ``(n, H, W)`` in ``rows`` / ``samples`` order."""
        for i, (sample, row) in enumerate(zip(samples, rows, strict=True)):
            path = Path(sample.path)
            name = path.relative_to(self.root) if path.is_relative_to(self.root) else path.name
            pic = Picture(
                path,
                Path(name),
                self.rule.key.replace("_", " "),
                row[self.rule.key],
                row["normalised_score"],
                row["decision"],
                None if sample.mask_path is None else Path(sample.mask_path),
            )
            self.pictures.add(pic, np.asarray(maps[i]))
            self._names.append(Path(name))

    def finish(self, out: Path, rows: list[dict[str, Any]], result: dict[str, Any]) -> None:
        """Write the pictures, add their paths to ``rows``, write ``report.html``."""
        files = self.pictures.write(out, self.save_masks)
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
            "decision": f"{self.rule.key} > {self.rule.value:.4g} (SOURCE-calibrated)",
            "normalised score": NORMALISED_NOTE,
            "heat maps": self.note,
            "contours": "green: predicted region (map above threshold); cyan: ground truth",
        }
        write_evaluate_report(out, rows, result, figures, settings)
