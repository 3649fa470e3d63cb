"""``dzad score``: score any images with a checkpoint.

Bad input ends with one ``error: <path>: <reason>`` line and exit code 2 before anything is written
(``--skip-bad``: a warning and a row marked ``skipped`` instead). ``dzad score`` checks ``--out``
is writable before loading the model, locks it for the run, stages its outputs and swaps them in
whole at the end: an earlier run's outputs stay until this run succeeds, then none of them is left
(no stale heat maps), and nothing is ever half-written.

The PATH arguments are read by :mod:`dzad.cli.score_inputs`; the run's staged outputs are
:mod:`dzad.cli.score_run`; the pictures' thresholds and the report's settings
:mod:`dzad.cli.score_pictures`; the printed table :mod:`dzad.cli.score_outputs`. ``dzad evaluate``
is :mod:`dzad.cli.evaluate_cmds`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import typer

from dzad.cli._app import MODEL_HELP, app, clean_errors
from dzad.cli.model_options import (
    COMPILE_HELP,
    THREADS_HELP,
    apply_options,
    check_regime_sources,
    config_option,
    load_model,
    regime_config,
    scoring_settings,
    set_option,
)
from dzad.cli.score_inputs import collect_inputs, decode_batch
from dzad.cli.score_outputs import print_scores
from dzad.cli.score_pictures import run_pictures, settings
from dzad.cli.score_run import ScoreRun, model_batches, score_into
from dzad.errors import DZADInputError
from dzad.io_utils import check_writable, lock_folder
from dzad.overrides import SCORING_KEYS
from dzad.run_panels import RunPictures

_PICTURES_HELP = (
    "Also draw, per image, a heat-map overlay (heatmaps/), a panel original | overlay | region "
    "(panels/) and the report's thumbnail (thumbs/); off by default: on the demo model they cost "
    "about as much as the scoring itself."
)


def _parse_threshold(value: str) -> float | None:
    if value == "auto":
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):  # nan would mark every image normal, inf every one too
        raise ValueError(f"--threshold: expected 'auto' or a finite number, got {value!r}")
    return number


@app.command("score")
@clean_errors
def score_cmd(
    paths: list[str] = typer.Argument(
        ..., help="Image files, folders (recursive) or glob patterns."
    ),
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    out: Path = typer.Option(Path("dzad-scores"), "--out", "-o", help="Output folder."),
    threshold: str = typer.Option(
        "auto",
        help="'auto': the checkpoint's SOURCE-calibrated detection threshold tau on the "
        "detection score; a number: threshold on the image score.",
    ),
    save_maps: bool = typer.Option(False, help="Also write the raw maps (.npy) under maps/."),
    save_masks: bool = typer.Option(
        False, help="Also write the predicted defect regions (binary PNG) under masks/."
    ),
    pictures: bool = typer.Option(False, help=_PICTURES_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON only."),
    skip_bad: bool = typer.Option(False, help="Warn about and skip unreadable inputs."),
    random_backbone: bool = typer.Option(False, help="Random backbone weights (tests only)."),
    batch_size: int = typer.Option(8, min=1, help="Images per forward."),
    threads: int = typer.Option(None, min=0, help=THREADS_HELP),
    compile_: str = typer.Option(None, "--compile", help=COMPILE_HELP),
    batch_zero_shot: bool = typer.Option(
        False, "--batch-zero-shot", help="Regime: score the given images together (unlabelled)."
    ),
    reference: Path = typer.Option(
        None, "--reference", help="Regime few-shot: folder of known-good images of the product."
    ),
    regime_params: Path = typer.Option(
        None, "--regime-params", help="Take the `regime` section of this params file."
    ),
    config: Path = config_option(),
    set_: list[str] = set_option(),
) -> None:
    """Score images: scores.csv, report.html, a table; with --pictures a heat-map overlay and
    panel per image.

    The checkpoint's config applies; --config / --set may change its scoring-time settings only
    (runtime, regime, anomaly_map, reconstruction, noise.max_batch, noise.precision).

    ``--out`` is locked for the run and receives this run's outputs only (scores.csv, report.html
    and the picture folders replaced whole at the end); a failure leaves it as it was.
    """
    thr = _parse_threshold(threshold)
    if out.exists() and not out.is_dir():
        raise DZADInputError(out, "--out exists and is not a folder")
    inputs, skipped = collect_inputs(paths, skip_bad, out)
    if batch_zero_shot and reference is not None:
        raise typer.BadParameter("choose one regime: --batch-zero-shot or --reference DIR")
    check_regime_sources(regime_params, config, set_)
    check_writable(out)  # before the model is loaded and any image scored
    with lock_folder(out, "dzad score run"):
        options = {"runtime.threads": threads, "runtime.compile": compile_}
        changes = scoring_settings(model, config, set_, options, SCORING_KEYS, json_out)
        dzad = load_model(model, random_backbone, changes)
        apply_options(dzad)
        if batch_zero_shot or reference is not None:
            from dzad.cli.score_regimes import score_regime

            rc = regime_config(dzad, regime_params)
            # each image decoded once, at the regime's size, before anything is written
            inputs, images, bad = decode_batch(
                inputs, rc.image_size, dzad.cfg.data.resample, skip_bad
            )
            if not inputs:
                raise DZADInputError(paths[0], "none of the given paths holds a readable image")
            skipped += bad
            got = score_regime(dzad, rc, inputs, images, out, reference, thr)
            rule, map_note, regime = got.rule, got.map_note, got.regime
            collector = RunPictures(got.level, draw=pictures)
            scored: Iterable = [(inputs, got.rows, got.maps, [])]
        else:
            rule, collector, map_note = run_pictures(dzad, thr, save_masks, model, pictures)
            scored, regime = (
                model_batches(dzad, inputs, batch_size, thr, rule, skip_bad),
                "zero-shot",
            )
        report = {**settings(model, threshold, rule, map_note, pictures), "regime": regime}
        run = ScoreRun(rule, collector, save_maps, save_masks, report)
        quiet = json_out or len(inputs) <= batch_size
        rows = score_into(scored, len(inputs), skipped, out, run, quiet)
    if json_out:
        doc = {"model": model, "out": str(out), "threshold": threshold, "regime": regime}
        print(json.dumps({**doc, "rows": rows}))
    else:
        print_scores(rows, out, f"{threshold}; regime {regime}")
