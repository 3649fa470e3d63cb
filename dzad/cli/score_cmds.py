"""Scoring commands: ``dzad score`` (any images) and ``dzad evaluate`` (an MVTec-layout root).

Bad input ends with one ``error: <path>: <reason>`` line and exit code 2 before anything is written
(``--skip-bad``: a warning and a row marked ``skipped`` instead). Every output file is written
atomically, so an earlier ``scores.csv`` or heat map is never lost or left half-written.

The PATH arguments of ``dzad score`` are read by :mod:`dzad.cli.score_inputs`; heat-map overlays
and the printed tables are :mod:`dzad.cli.score_outputs`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from dzad.cli._app import app, clean_errors
from dzad.cli.score_inputs import check_images, collect_inputs
from dzad.cli.score_outputs import print_metrics, print_scores, write_image_outputs
from dzad.errors import BackboneUnavailable, DZADInputError


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


def _parse_threshold(value: str) -> float | None:
    if value == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter(f"expected 'auto' or a number, got {value!r}") from None


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
    """Score images: scores.csv, one heat-map overlay per image, a summary table."""
    import pandas as pd
    import torch

    from dzad.data.images import load_image
    from dzad.io_utils import atomic_write_text

    thr = _parse_threshold(threshold)
    if out.exists() and not out.is_dir():
        raise DZADInputError(out, "--out exists and is not a folder")
    inputs, skipped = collect_inputs(paths, skip_bad, out)
    dzad = load_model(model, random_backbone)
    size, resample = dzad.image_size, dzad.cfg.data.resample
    inputs, bad = check_images(inputs, size, resample, skip_bad)
    skipped += bad
    if not inputs:
        raise DZADInputError(paths[0], "none of the given paths holds a readable image")
    rows: list[dict[str, Any]] = []
    regime = "zero-shot"
    if batch_zero_shot and reference is not None:
        raise typer.BadParameter("choose one regime: --batch-zero-shot or --reference DIR")
    if batch_zero_shot or reference is not None:
        from dzad.cli.score_regimes import score_regime

        rc = regime_config(dzad, regime_params)
        rows, regime = score_regime(dzad, rc, inputs, out, reference, thr, save_maps)
        inputs = []  # scored
    prog, task = _progress(not json_out and len(inputs) > batch_size, len(inputs), "scoring")
    with prog:
        for batch in _batches(inputs, batch_size):
            images = torch.stack([load_image(i.path, size, resample) for i in batch])
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
                        "heatmap": write_image_outputs(item, out, maps[k], save_maps),
                        "error": None,
                    }
                )
            prog.advance(task, len(batch))
    rows += skipped
    columns = ["path", "image_score", "detection_score", "decision", "heatmap", "error"]
    table = pd.DataFrame.from_records(rows, columns=columns)
    atomic_write_text(out / "scores.csv", table.to_csv(index=False))
    if json_out:
        doc = {"model": model, "out": str(out), "threshold": threshold, "regime": regime}
        print(json.dumps({**doc, "rows": rows}))
    else:
        print_scores(rows, out, f"{threshold}; regime {regime}")


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
    """The paper's protocol on every category under --data: metrics, scores, figures."""
    from dzad.evaluation import build_controls, category_samples, evaluate, source_batches

    dzad = load_model(model, random_backbone)
    eval_cfg = dzad.cfg.evaluate
    if batch_zero_shot and few_shot:
        raise typer.BadParameter("choose one regime: --batch-zero-shot or --few-shot K")
    if batch_zero_shot or few_shot:
        return _evaluate_regime(
            dzad, data, out, _categories(categories), regime_params, eval_cfg, few_shot,
            batch_size, max_images, skip_bad, json_out,
        )  # fmt: skip
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
