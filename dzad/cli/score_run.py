"""What one ``dzad score`` run writes: its scored batches staged, then swapped into ``--out``.

:func:`model_batches` scores the inputs per image (zero-shot), a batch per forward;
:func:`score_into` stages the rows' ``scores.csv``, ``report.html``, the optional pictures, masks
and raw maps, and swaps them into ``--out`` whole (:func:`dzad.io_utils.replace_outputs`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dzad.cli.model_options import progress
from dzad.cli.score_inputs import ScoreInput, decode_batch
from dzad.cli.score_outputs import save_raw_map
from dzad.cli.score_pictures import SCORE_COLUMNS, picture
from dzad.decisions import Threshold
from dzad.errors import DZADInputError
from dzad.io_utils import replace_outputs, write_error
from dzad.run_panels import FILES, RunPictures

# replaced whole by each run; the report and the scores table last (they list the pictures)
SCORE_OUTPUTS = ("heatmaps", "panels", "thumbs", "masks", "maps", "report.html", "scores.csv")


@dataclass(frozen=True)
class ScoreRun:
    """What one ``dzad score`` run writes besides the scores: its decision rule, its pictures
    (drawn with ``--pictures``), the optional raw maps / masks, the settings its report states."""

    rule: Threshold
    pictures: RunPictures
    save_maps: bool
    save_masks: bool
    report: dict[str, str]

    @property
    def keeps_maps(self) -> bool:
        """Whether the pictures need each map until the run ends (to draw or mask it)."""
        return self.pictures.draw or self.save_masks


def score_into(
    scored: Iterable, total: int, skipped: list[dict[str, Any]], out: Path, run: ScoreRun,
    quiet: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    """Stage the pictures (and maps), scores.csv and report.html of the ``scored`` batches
    ``(items, rows, maps (B, h, w), bad rows)`` of ``total`` inputs, then swap them into ``out``
    (``skipped`` rows, then the bad ones, last); a full disk or any other write error, or an
    error from ``scored``, leaves ``out`` as it was. Returns the rows."""
    import pandas as pd

    from dzad.html_report import write_score_report
    from dzad.io_utils import atomic_write_text

    rows: list[dict[str, Any]] = []
    names: list[Path] = []  # the scored items' output names, in row order
    bad: list[dict[str, Any]] = []
    prog = progress(not quiet, total, "scoring")
    try:
        with prog, replace_outputs(out, SCORE_OUTPUTS) as stage:
            for items, batch_rows, maps, batch_bad in scored:
                for item, row, m in zip(items, batch_rows, maps, strict=True):
                    if run.keeps_maps:
                        run.pictures.add(picture(item.path, item.rel, row, run.rule), m)
                    if run.save_maps:
                        save_raw_map(item, stage, m)
                rows += batch_rows
                names += [item.rel for item in items]
                bad += batch_bad
                prog.advance(len(items) + len(batch_bad))
            files = run.pictures.write(stage, run.save_masks)
            for row, name in zip(rows, names, strict=True):
                row.update({k: files.get(name, {}).get(k) for k in FILES})
                row["error"] = None
            rows += skipped + bad
            table = pd.DataFrame.from_records(rows, columns=[*SCORE_COLUMNS, *FILES, "error"])
            atomic_write_text(stage / "scores.csv", table.to_csv(index=False))
            write_score_report(stage, rows, run.report)
    except OSError as exc:
        raise write_error(out, exc) from None
    return rows


def model_batches(
    dzad, inputs: list[ScoreInput], batch: int, thr: float | None, rule: Threshold, skip_bad: bool
) -> Iterator[tuple[list[ScoreInput], list[dict[str, Any]], Any, list[dict[str, Any]]]]:
    """Per-image (zero-shot) scoring, ``batch`` inputs per forward, each image decoded once
    (:func:`dzad.cli.score_inputs.decode_batch`): ``(items, rows, maps (B, h, w), skipped rows of
    the unreadable inputs)``. The decision is the checkpoint's (``thr`` None) or ``image_score >
    thr``. When no input is readable, the last batch raises :class:`DZADInputError`."""
    size, resample = dzad.image_size, dzad.cfg.data.resample
    scored = 0
    for start in range(0, len(inputs), batch):
        items, images, bad = decode_batch(inputs[start : start + batch], size, resample, skip_bad)
        if images is None:  # every input of this batch was unreadable (--skip-bad)
            if start + batch >= len(inputs) and not scored:
                raise DZADInputError(
                    inputs[0].shown, "none of the given paths holds a readable image"
                )
            yield [], [], [], bad
            continue
        scored += len(items)
        result = dzad(images)
        # one conversion per batch, not one tensor indexing per value
        image_scores = result.image_score.tolist()
        detection_scores = result.detection_score.tolist()
        decisions = result.decision.tolist()
        rows = []
        for k, item in enumerate(items):
            anomalous = decisions[k] if thr is None else image_scores[k] > thr
            row = {
                "path": item.shown,
                "image_score": image_scores[k],
                "detection_score": detection_scores[k],
                "decision": "anomalous" if anomalous else "normal",
            }
            rows.append({**row, "normalised_score": rule.normalise(row[rule.key])})
        yield items, rows, result.anomaly_map[:, 0].float().cpu().numpy(), bad
