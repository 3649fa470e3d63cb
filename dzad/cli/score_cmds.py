"""Scoring commands: ``dzad score`` (any images) and ``dzad evaluate`` (an MVTec-layout root).

Bad input ends with one ``error: <path>: <reason>`` line and exit code 2 before anything is written
(``--skip-bad``: a warning and a row marked ``skipped`` instead). ``dzad score`` checks ``--out``
is writable before loading the model, locks it for the run, stages its outputs and swaps them in
whole at the end: an earlier run's outputs stay until this run succeeds, then none of them is left
(no stale heat maps), and nothing is ever half-written.

The PATH arguments of ``dzad score`` are read by :mod:`dzad.cli.score_inputs`; heat-map overlays
and the printed tables are :mod:`dzad.cli.score_outputs`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from dzad.cli._app import app, clean_errors
from dzad.cli.score_inputs import check_images, collect_inputs
from dzad.cli.score_outputs import (
    SHOWN_MAX_SIDE,
    print_metrics,
    print_scores,
    write_image_outputs,
)
from dzad.errors import BackboneUnavailable, DZADInputError
from dzad.io_utils import (
    atomic_write_text,
    check_writable,
    lock_folder,
    replace_outputs,
    write_error,
)


# ------------------------------------------------------------------------------------- helpers
def resolve_model(uri: str) -> Path:
    """The checkpoint folder a ``--model`` value names (registry URIs plug in here)."""
    if uri.startswith("models:/"):
        from flows.tracking.registry import resolve_model as resolve_registry  # lazy: MLflow only

        return resolve_registry(uri)
    return Path(uri)


def load_model(uri: str, random_backbone: bool):
    """DZAD from ``--model`` (on the GPU when there is one); a missing backbone says how to
    proceed instead of a trace."""
    import torch

    from dzad.model import DZAD

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return DZAD.from_checkpoint(
            resolve_model(uri), random_backbone=random_backbone, map_location=device
        )
    except BackboneUnavailable as exc:
        raise BackboneUnavailable(
            f"{exc} -- stopping; pass --random-backbone only for tests (random features)"
        ) from None


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _progress(enabled: bool, total: int, what: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    prog = Progress(
        f"[bold]{what}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )
    return prog, prog.add_task(what, total=total)


def _runtime(dzad, threads: int | None, compile_: str | None):
    """The checkpoint's ``runtime`` config with ``--threads`` / ``--compile`` on top, applied
    (thread count, compiled network) before anything is scored."""
    from dzad.config import validate
    from dzad.runtime import apply_runtime

    changes = {k: v for k, v in (("threads", threads), ("compile", compile_)) if v is not None}
    cfg = validate(replace(dzad.cfg, runtime=replace(dzad.cfg.runtime, **changes)))
    apply_runtime(cfg.runtime, dzad)


_THREADS_HELP = "torch threads (default: the checkpoint's runtime.threads; 0 = torch's default)."
_COMPILE_HELP = "auto | on | off: torch.compile the network (default: runtime.compile)."


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


# ------------------------------------------------------------------------------------ commands
@app.command("score")
@clean_errors
def score_cmd(
    paths: list[str] = typer.Argument(
        ..., help="Image files, folders (recursive) or glob patterns."
    ),
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint folder."),
    out: Path = typer.Option(Path("dzad-scores"), "--out", "-o", help="Output folder."),
    threshold: str = typer.Option(
        "auto",
        help="'auto': the checkpoint's SOURCE-calibrated detection threshold tau on the "
        "detection score; a number: threshold on the image score.",
    ),
    save_maps: bool = typer.Option(False, help="Also write the raw maps (.npy) under maps/."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON only."),
    skip_bad: bool = typer.Option(False, help="Warn about and skip unreadable inputs."),
    random_backbone: bool = typer.Option(False, help="Random backbone weights (tests only)."),
    batch_size: int = typer.Option(8, min=1, help="Images per forward."),
    threads: int = typer.Option(None, min=0, help=_THREADS_HELP),
    compile_: str = typer.Option(None, "--compile", help=_COMPILE_HELP),
) -> None:
    """Score images: scores.csv, one heat-map overlay per image, a summary table.

    ``--out`` is locked for the run and receives this run's outputs only (scores.csv, heatmaps/,
    maps/ replaced whole at the end); a failure leaves it as it was.
    """
    thr = _parse_threshold(threshold)
    if out.exists() and not out.is_dir():
        raise DZADInputError(out, "--out exists and is not a folder")
    inputs, skipped = collect_inputs(paths, skip_bad, out)
    check_writable(out)  # before the model is loaded and any image scored
    with lock_folder(out, "dzad score run"):
        dzad = load_model(model, random_backbone)
        _runtime(dzad, threads, compile_)
        inputs, bad = check_images(inputs, dzad.image_size, dzad.cfg.data.resample, skip_bad)
        if not inputs:
            raise DZADInputError(paths[0], "none of the given paths holds a readable image")
        rows = _score_into(dzad, inputs, skipped + bad, out, thr, save_maps, json_out, batch_size)
    if json_out:
        print(json.dumps({"model": model, "out": str(out), "threshold": threshold, "rows": rows}))
    else:
        print_scores(rows, out, threshold)


_SCORE_OUTPUTS = ("heatmaps", "maps", "scores.csv")  # replaced whole by each run, table last
_COLUMNS = ["path", "image_score", "detection_score", "decision", "heatmap", "error"]


def _score_into(
    dzad,
    inputs: list,
    skipped: list[dict[str, Any]],
    out: Path,
    thr: float | None,
    save_maps: bool,
    quiet: bool,
    batch_size: int,
) -> list[dict[str, Any]]:
    """Score ``inputs`` in batches, stage the heat maps (and maps), then swap them into ``out``
    with scores.csv (``skipped`` rows last); a full disk or any other write error leaves ``out``
    as it was. Returns the rows."""
    import pandas as pd
    import torch

    from dzad.data.images import load_image_pair

    size, resample = dzad.image_size, dzad.cfg.data.resample
    rows: list[dict[str, Any]] = []
    prog, task = _progress(not quiet and len(inputs) > batch_size, len(inputs), "scoring")
    try:
        with prog, replace_outputs(out, _SCORE_OUTPUTS) as stage:
            for batch in _batches(inputs, batch_size):
                # each file decoded once for the model's input and the overlay's picture
                pairs = [load_image_pair(i.path, size, resample, SHOWN_MAX_SIDE) for i in batch]
                images = torch.stack([model_input for model_input, _ in pairs])
                result = dzad(images)
                maps = result.anomaly_map[:, 0].float().cpu().numpy()
                for k, item in enumerate(batch):
                    img_score = float(result.image_score[k])
                    anomalous = bool(result.decision[k]) if thr is None else img_score > thr
                    rows.append(
                        {
                            "path": item.shown,
                            "image_score": img_score,
                            "detection_score": float(result.detection_score[k]),
                            "decision": "anomalous" if anomalous else "normal",
                            "heatmap": write_image_outputs(
                                item, stage, maps[k], save_maps, pairs[k][1]
                            ),
                            "error": None,
                        }
                    )
                prog.advance(task, len(batch))
            rows += skipped
            table = pd.DataFrame.from_records(rows, columns=_COLUMNS)
            atomic_write_text(stage / "scores.csv", table.to_csv(index=False))
    except OSError as exc:
        raise write_error(out, exc) from None
    return rows


def _categories(values: list[str] | None) -> list[str]:
    return [c for v in values or [] for c in v.split(",") if c]


def _source_refs(dzad, source: Path | None, source_categories: list[str] | None):
    from dzad.config import DatasetRef

    if source is not None:
        return [DatasetRef(str(source), tuple(_categories(source_categories)))]
    return list(dzad.cfg.sets.source)


@app.command("evaluate")
@clean_errors
def evaluate_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint folder."),
    data: Path = typer.Option(..., "--data", help="Dataset root in MVTec layout."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    categories: list[str] = typer.Option(
        None, help="Categories (repeat or comma-separate); default: every category under --data."
    ),
    controls: bool = typer.Option(
        None,
        "--controls/--no-controls",
        help="Score the controls (default: the checkpoint's evaluate.controls).",
    ),
    source: Path = typer.Option(
        None, help="SOURCE dataset root for the controls (default: the checkpoint's sets.source)."
    ),
    source_categories: list[str] = typer.Option(None, help="Categories of --source."),
    random_backbone: bool = typer.Option(False, help="Random backbone weights (tests only)."),
    batch_size: int = typer.Option(None, min=1, help="Images per forward."),
    max_images: int = typer.Option(None, min=0, help="Seeded subset per category (0 = all)."),
    save_maps: bool = typer.Option(False, help="Write maps/<category>.npy."),
    skip_bad: bool = typer.Option(False, help="Warn about and skip unreadable files."),
    json_out: bool = typer.Option(False, "--json", help="Print metrics.json only."),
    threads: int = typer.Option(None, min=0, help=_THREADS_HELP),
    compile_: str = typer.Option(None, "--compile", help=_COMPILE_HELP),
) -> None:
    """The paper's protocol on every category under --data: metrics, scores, figures."""
    from dzad.evaluation import build_controls, category_samples, evaluate, source_batches

    check_writable(out)  # before the model is loaded and anything evaluated
    dzad = load_model(model, random_backbone)
    _runtime(dzad, threads, compile_)
    eval_cfg = dzad.cfg.evaluate
    given = (("batch_size", batch_size), ("max_images", max_images))
    changes = {k: v for k, v in given if v is not None}
    eval_cfg = replace(eval_cfg, **changes)
    use_controls = eval_cfg.controls if controls is None else controls
    cats = _categories(categories)
    if not data.is_dir():
        raise DZADInputError(data, "dataset root is not a folder")
    fitted = None
    if use_controls:
        refs = _source_refs(dzad, source, source_categories)
        missing = [r.root for r in refs if not Path(r.root).is_dir()]
        if not refs or missing:
            where = missing[0] if missing else "sets.source"
            raise DZADInputError(
                where,
                "the controls need the SOURCE normals; pass --source ROOT "
                "(MVTec layout) or --no-controls",
            )
        data_cfg = replace(dzad.cfg.data, skip_bad=skip_bad)
        fitted = build_controls(
            dzad,
            eval_cfg,
            lambda: source_batches(refs, dzad.image_size, data_cfg, eval_cfg.batch_size),
        )
    from dzad.data.dataset import list_categories

    names = cats or list_categories(data)
    total = sum(len(category_samples(data, c, eval_cfg, dzad.cfg.seed, skip_bad)) for c in names)
    prog, task = _progress(not json_out, total, "evaluating")
    with prog:
        result = evaluate(
            dzad,
            data,
            names,
            out,
            eval_cfg,
            fitted,
            save_maps=save_maps,
            skip_bad=skip_bad,
            progress=lambda n: prog.advance(task, n),
        )
    if json_out:
        print(json.dumps(result))
    else:
        print_metrics(result, out)
