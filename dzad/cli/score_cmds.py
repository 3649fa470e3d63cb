"""Scoring commands: ``dzad score`` (any images) and ``dzad evaluate`` (an MVTec-layout root).

Bad input ends with one ``error: <path>: <reason>`` line and exit code 2 before anything is written
(``--skip-bad``: a warning and a row marked ``skipped`` instead). ``dzad score`` checks ``--out``
is writable before loading the model, locks it for the run, stages its outputs and swaps them in
whole at the end: an earlier run's outputs stay until this run succeeds, then none of them is left
(no stale heat maps), and nothing is ever half-written.

The PATH arguments of ``dzad score`` are read by :mod:`dzad.cli.score_inputs`; heat-map pictures,
masks and the HTML report are :mod:`dzad.cli.score_pictures`; the printed tables are
:mod:`dzad.cli.score_outputs`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import typer

from dzad.cli._app import (
    CATEGORIES_HELP,
    MODEL_HELP,
    MODEL_RESOLVERS,
    app,
    clean_errors,
    split_list,
)
from dzad.cli.score_inputs import check_images, collect_inputs, load_batch
from dzad.cli.score_outputs import print_metrics, print_scores, save_raw_map
from dzad.cli.score_pictures import SCORE_COLUMNS, picture, run_pictures, settings
from dzad.decisions import Threshold
from dzad.errors import BackboneUnavailable, DZADInputError
from dzad.io_utils import (
    atomic_write_text,
    check_writable,
    lock_folder,
    replace_outputs,
    write_error,
)
from dzad.run_panels import RunPictures


# ------------------------------------------------------------------------------------- helpers
def resolve_model(uri: str) -> Path:
    """The checkpoint folder a ``--model`` value names: a folder, or a URI of a scheme that is
    plugged into :data:`dzad.cli._app.MODEL_RESOLVERS` (``models:/`` by the ``dzad`` command)."""
    for scheme, resolve in MODEL_RESOLVERS.items():
        if uri.startswith(scheme):
            return resolve(uri)
    if uri.startswith("models:/"):
        raise DZADInputError(uri, "registry URIs need the `dzad` command (flows.cli), not -m dzad")
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
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON only."),
    skip_bad: bool = typer.Option(False, help="Warn about and skip unreadable inputs."),
    random_backbone: bool = typer.Option(False, help="Random backbone weights (tests only)."),
    batch_size: int = typer.Option(8, min=1, help="Images per forward."),
    threads: int = typer.Option(None, min=0, help=_THREADS_HELP),
    compile_: str = typer.Option(None, "--compile", help=_COMPILE_HELP),
    batch_zero_shot: bool = typer.Option(
        False, "--batch-zero-shot", help="Regime: score the given images together (unlabelled)."
    ),
    reference: Path = typer.Option(
        None, "--reference", help="Regime few-shot: folder of known-good images of the product."
    ),
    regime_params: Path = typer.Option(
        None, "--regime-params", help="Take the `regime` section of this params file."
    ),
) -> None:
    """Score images: scores.csv, a heat-map overlay and panel per image, report.html, a table.

    ``--out`` is locked for the run and receives this run's outputs only (scores.csv, report.html
    and the picture folders replaced whole at the end); a failure leaves it as it was.
    """
    thr = _parse_threshold(threshold)
    if out.exists() and not out.is_dir():
        raise DZADInputError(out, "--out exists and is not a folder")
    inputs, skipped = collect_inputs(paths, skip_bad, out)
    if batch_zero_shot and reference is not None:
        raise typer.BadParameter("choose one regime: --batch-zero-shot or --reference DIR")
    check_writable(out)  # before the model is loaded and any image scored
    with lock_folder(out, "dzad score run"):
        dzad = load_model(model, random_backbone)
        _runtime(dzad, threads, compile_)
        inputs, bad = check_images(inputs, dzad.image_size, dzad.cfg.data.resample, skip_bad)
        if not inputs:
            raise DZADInputError(paths[0], "none of the given paths holds a readable image")
        if batch_zero_shot or reference is not None:
            if save_masks:
                raise DZADInputError(model, "--save-masks: the regimes' maps have no map threshold")
            from dzad.cli.score_regimes import score_regime

            rc = regime_config(dzad, regime_params)
            rows, maps, rule, regime = score_regime(dzad, rc, inputs, out, reference, thr)
            pictures, map_note = RunPictures(None), f"{regime}: one colour scale, no map threshold"
            scored: Iterable = [(inputs, rows, maps)]
        else:
            rule, pictures, map_note = run_pictures(dzad, thr, save_masks, model)
            scored, regime = _model_batches(dzad, inputs, batch_size, thr, rule), "zero-shot"
        report = {**settings(model, threshold, rule, map_note), "regime": regime}
        run = _Run(rule, pictures, save_maps, save_masks, report)
        quiet = json_out or len(inputs) <= batch_size
        rows = _score_into(scored, inputs, skipped + bad, out, run, quiet)
    if json_out:
        doc = {"model": model, "out": str(out), "threshold": threshold, "regime": regime}
        print(json.dumps({**doc, "rows": rows}))
    else:
        print_scores(rows, out, f"{threshold}; regime {regime}")


# replaced whole by each run; the report and the scores table last (they list the pictures)
_SCORE_OUTPUTS = ("heatmaps", "panels", "thumbs", "masks", "maps", "report.html", "scores.csv")


@dataclass(frozen=True)
class _Run:
    """What one ``dzad score`` run writes besides the scores: its threshold, decision rule and
    pictures, the optional raw maps / masks, and the settings its HTML report states."""

    rule: Threshold
    pictures: RunPictures
    save_maps: bool
    save_masks: bool
    report: dict[str, str]


def _score_into(
    scored: Iterable, inputs: list, skipped: list[dict[str, Any]], out: Path, run: _Run, quiet: bool
) -> list[dict[str, Any]]:
    """Stage the pictures (and maps), scores.csv and report.html of the ``scored`` batches
    ``(items, rows, maps (B, h, w))`` of ``inputs``, then swap them into ``out`` (``skipped`` rows
    last); a full disk or any other write error leaves ``out`` as it was. Returns the rows."""
    import pandas as pd

    from dzad.html_report import write_score_report
    from dzad.run_panels import FILES

    rows: list[dict[str, Any]] = []
    prog, task = _progress(not quiet, len(inputs), "scoring")
    try:
        with prog, replace_outputs(out, _SCORE_OUTPUTS) as stage:
            for items, batch_rows, maps in scored:
                for item, row, m in zip(items, batch_rows, maps, strict=True):
                    run.pictures.add(picture(item.path, item.rel, row, run.rule), m)
                    if run.save_maps:
                        save_raw_map(item, stage, m)
                rows += batch_rows
                prog.advance(task, len(items))
            files = run.pictures.write(stage, run.save_masks)
            for row, item in zip(rows, inputs, strict=True):
                row.update({k: files[item.rel].get(k) for k in FILES})
                row["error"] = None
            rows += skipped
            table = pd.DataFrame.from_records(rows, columns=[*SCORE_COLUMNS, *FILES, "error"])
            atomic_write_text(stage / "scores.csv", table.to_csv(index=False))
            write_score_report(stage, rows, run.report)
    except OSError as exc:
        raise write_error(out, exc) from None
    return rows


def _model_batches(
    dzad, inputs: list, batch: int, thr: float | None, rule: Threshold
) -> Iterator[tuple[list, list[dict[str, Any]], Any]]:
    """Per-image (zero-shot) scoring, ``batch`` images per forward: ``(items, rows, maps (B, h,
    w))``; the decision is the checkpoint's (``thr`` None) or ``image_score > thr``."""
    size, resample = dzad.image_size, dzad.cfg.data.resample
    for items in _batches(inputs, batch):
        result = dzad(load_batch(items, size, resample))
        rows = []
        for k, item in enumerate(items):
            img_score = float(result.image_score[k])
            anomalous = bool(result.decision[k]) if thr is None else img_score > thr
            row = {
                "path": item.shown,
                "image_score": img_score,
                "detection_score": float(result.detection_score[k]),
                "decision": "anomalous" if anomalous else "normal",
            }
            rows.append({**row, "normalised_score": rule.normalise(row[rule.key])})
        yield items, rows, result.anomaly_map[:, 0].float().cpu().numpy()


def _source_refs(dzad, source: Path | None, source_categories: list[str] | None):
    from dzad.config import DatasetRef

    if source is not None:
        return [DatasetRef(str(source), tuple(split_list(source_categories)))]
    return list(dzad.cfg.sets.source)


@app.command("evaluate")
@clean_errors
def evaluate_cmd(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    data: Path = typer.Option(..., "--data", help="Dataset root in MVTec layout."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    categories: list[str] = typer.Option(None, help=CATEGORIES_HELP),
    controls: bool = typer.Option(
        None,
        "--controls/--no-controls",
        help="Score the controls (default: the checkpoint's evaluate.controls).",
    ),
    source: Path = typer.Option(
        None, help="SOURCE dataset root for the controls (default: the checkpoint's sets.source)."
    ),
    source_categories: list[str] = typer.Option(None, help=f"Of --source. {CATEGORIES_HELP}"),
    random_backbone: bool = typer.Option(False, help="Random backbone weights (tests only)."),
    batch_size: int = typer.Option(None, min=1, help="Images per forward."),
    max_images: int = typer.Option(None, min=0, help="Seeded subset per category (0 = all)."),
    save_maps: bool = typer.Option(False, help="Write maps/<category>.npy."),
    save_masks: bool = typer.Option(
        False, help="Also write the predicted defect regions (binary PNG) under masks/."
    ),
    skip_bad: bool = typer.Option(False, help="Warn about and skip unreadable files."),
    json_out: bool = typer.Option(False, "--json", help="Print metrics.json only."),
    threads: int = typer.Option(None, min=0, help=_THREADS_HELP),
    compile_: str = typer.Option(None, "--compile", help=_COMPILE_HELP),
    batch_zero_shot: bool = typer.Option(
        False, "--batch-zero-shot", help="Regime: each category's test images scored together."
    ),
    few_shot: int = typer.Option(
        0, "--few-shot", min=0, help="Regime: K train/good references per category (0 = off)."
    ),
    regime_params: Path = typer.Option(
        None, "--regime-params", help="Take the `regime` section of this params file."
    ),
) -> None:
    """The paper's protocol on every category under --data: metrics, scores, figures, a heat-map
    panel per image and report.html."""
    from dzad.evaluation import build_controls, category_samples, evaluate, source_batches

    check_writable(out)  # before the model is loaded and anything evaluated
    dzad = load_model(model, random_backbone)
    _runtime(dzad, threads, compile_)
    if not json_out:
        from dzad.checkpoint import read_meta
        from dzad.training_data import describe

        typer.echo(f"model trained on {describe(read_meta(resolve_model(model)).get('data'))}")
    eval_cfg = dzad.cfg.evaluate
    if batch_zero_shot and few_shot:
        raise typer.BadParameter("choose one regime: --batch-zero-shot or --few-shot K")
    if batch_zero_shot or few_shot:
        return _evaluate_regime(
            dzad, data, out, split_list(categories), regime_params, eval_cfg, few_shot,
            batch_size, max_images, skip_bad, json_out,
        )  # fmt: skip
    given = (("batch_size", batch_size), ("max_images", max_images))
    changes = {k: v for k, v in given if v is not None}
    eval_cfg = replace(eval_cfg, **changes)
    use_controls = eval_cfg.controls if controls is None else controls
    cats = split_list(categories)
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
            pictures=True,
            save_masks=save_masks,
        )
    if json_out:
        print(json.dumps(result))
    else:
        print_metrics(result, out)


def regime_config(dzad, regime_params: Path | None):
    """The checkpoint's ``regime`` section, or that of ``--regime-params`` (errors name it)."""
    if regime_params is None:
        return dzad.cfg.regime
    from dzad.config import load

    if not regime_params.is_file():
        raise DZADInputError(regime_params, "--regime-params is not a file")
    try:
        return load(regime_params).regime
    except ValueError as exc:
        raise DZADInputError(regime_params, str(exc).split(": ", 1)[-1]) from None


def _evaluate_regime(
    dzad, data, out, cats, regime_params, eval_cfg, few_shot, batch_size, max_images, skip_bad,
    json_out,
) -> None:  # fmt: skip
    """``evaluate --batch-zero-shot`` / ``--few-shot K`` (:mod:`dzad.regime_evaluation`)."""
    from dzad.data.dataset import list_categories
    from dzad.evaluation import category_samples, control_backbone
    from dzad.regime_evaluation import evaluate_regime

    rc = regime_config(dzad, regime_params)
    given = (("batch_size", batch_size), ("max_images", max_images))
    eval_cfg = replace(eval_cfg, **{k: v for k, v in given if v is not None})
    if not data.is_dir():
        raise DZADInputError(data, "dataset root is not a folder")
    names = cats or list_categories(data)
    total = sum(len(category_samples(data, c, eval_cfg, dzad.cfg.seed, skip_bad)) for c in names)
    prog, task = _progress(not json_out, total, "evaluating")
    with prog:
        result = evaluate_regime(
            dzad, control_backbone(dzad), data, names, out, rc, eval_cfg,
            few_shot=few_shot, skip_bad=skip_bad, progress=lambda n: prog.advance(task, n),
        )  # fmt: skip
    if json_out:
        print(json.dumps(result))
    else:
        print_metrics(result, out)
