"""Scoring commands: ``dzad score`` (any images) and ``dzad evaluate`` (an MVTec-layout root).

Bad input ends with one ``error: <path>: <reason>`` line and exit code 2 before anything is written
(``--skip-bad``: a warning and a row marked ``skipped`` instead). Every output file is written
atomically, so an earlier ``scores.csv`` or heat map is never lost or left half-written.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import typer

from dzad.cli._app import app, clean_errors
from dzad.errors import BackboneUnavailable, DZADInputError

_GLOB_CHARS = set("*?[")
_TABLE_ROWS = 30


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


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass(frozen=True)
class _Input:
    path: Path  # as found (absolute)
    shown: str  # as the user wrote it / as found under the folder they gave
    rel: Path = Path()  # unique name under the output folders


def _is_image_name(p: Path) -> bool:
    from dzad.data.images import IMAGE_SUFFIXES

    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and _is_image_name(f))


def _expand(arg: str) -> list[tuple[Path, str]]:
    """One PATH argument -> (absolute path, shown name) pairs; DZADInputError when it has none.

    A file given by name is always tried (a non-image then fails to load with a clear error);
    folders and glob matches contribute the files with image suffixes.
    """
    p = Path(arg)
    if p.is_dir():
        files = _image_files(p)
        if not files:
            raise DZADInputError(p, "folder holds no image files (searched recursively)")
        return [(f.resolve(), str(f)) for f in files]
    if p.exists():
        return [(p.resolve(), arg)]
    if _GLOB_CHARS & set(arg):
        out = []
        for m in sorted(glob.glob(arg, recursive=True)):
            mp = Path(m)
            if mp.is_dir():
                out += [(f.resolve(), str(f)) for f in _image_files(mp)]
            elif _is_image_name(mp):
                out.append((mp.resolve(), m))
        if not out:
            raise DZADInputError(p, "no image file matches this pattern")
        return out
    raise DZADInputError(p, "no such file or folder")


def collect_inputs(
    args: list[str], skip_bad: bool, out: Path
) -> tuple[list[_Input], list[dict[str, Any]]]:
    """Expand PATH arguments; unique output names relative to the inputs' common folder.

    Files inside the output folder ``out`` (earlier heat maps) are never inputs. Returns (inputs,
    skipped rows). Without ``skip_bad`` the first bad argument raises.
    """
    found: dict[Path, str] = {}
    skipped: list[dict[str, Any]] = []
    out = out.resolve()
    for arg in args:
        try:
            for path, shown in _expand(arg):
                if not path.is_relative_to(out):
                    found.setdefault(path, shown)
        except DZADInputError as exc:
            if not skip_bad:
                raise
            _warn(f"skipped: {exc}")
            skipped.append(_skipped_row(arg, exc))
    if not found:
        if skipped:
            raise DZADInputError(args[0], "none of the given paths holds a readable image")
        raise DZADInputError(args[0], "no image to score (files inside --out are not inputs)")
    common = Path(os.path.commonpath([p.parent for p in found]))
    return [_Input(p, s, p.relative_to(common)) for p, s in found.items()], skipped


def _skipped_row(shown: str, exc: Exception) -> dict[str, Any]:
    return {
        "path": shown,
        "image_score": None,
        "detection_score": None,
        "decision": "skipped",
        "heatmap": None,
        "error": str(exc),
    }


def _check_images(inputs: list[_Input], size: int, resample: str, skip_bad: bool):
    """Decode every image once before anything is written; bad ones raise or are skipped."""
    from dzad.data.images import load_image

    good, skipped = [], []
    for item in inputs:
        try:
            load_image(item.path, size, resample)
            good.append(item)
        except DZADInputError as exc:
            if not skip_bad:
                raise DZADInputError(item.shown, exc.reason) from None
            _warn(f"skipped: {item.shown}: {exc.reason}")
            skipped.append(_skipped_row(item.shown, DZADInputError(item.shown, exc.reason)))
    return good, skipped


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


def _write_image_outputs(item: _Input, out: Path, score_map, save_maps: bool) -> str:
    """Overlay PNG (and raw map) for one image; returns the overlay's path relative to ``out``."""
    import numpy as np
    from PIL import Image

    from dzad.data.images import load_image
    from dzad.io_utils import atomic_path
    from dzad.reports import overlay

    shown = load_image(item.path, max_side=512).permute(1, 2, 0).numpy()
    rel = Path("heatmaps") / item.rel.with_name(item.rel.name + ".heatmap.png")
    with atomic_path(out / rel) as tmp:
        Image.fromarray(overlay(shown, score_map)).save(tmp, format="PNG")
    if save_maps:
        with atomic_path(out / "maps" / item.rel.with_name(item.rel.name + ".npy")) as tmp:
            np.save(tmp, score_map.astype(np.float32))
    return str(rel)


def _parse_threshold(value: str) -> float | None:
    if value == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter(f"expected 'auto' or a number, got {value!r}") from None


def _print_scores(rows: list[dict[str, Any]], out: Path, threshold: str) -> None:
    from rich.console import Console
    from rich.table import Table

    scored = sorted(
        (r for r in rows if r["decision"] != "skipped"), key=lambda r: -r["image_score"]
    )
    shown = scored[:_TABLE_ROWS] + [r for r in rows if r["decision"] == "skipped"]
    caption = f"{len(scored)} scored, {len(rows) - len(scored)} skipped; threshold {threshold}"
    if len(scored) > _TABLE_ROWS:
        caption += f"; top {_TABLE_ROWS} by image score shown, all rows in scores.csv"
    table = Table(title="DZAD scores", caption=caption)
    for col in ("path", "image score", "detection score", "decision"):
        if col == "path":
            table.add_column(col, overflow="fold")
        else:
            table.add_column(col, justify="right")
    for r in shown:
        if r["decision"] == "skipped":
            table.add_row(r["path"], "-", "-", f"[yellow]skipped[/]: {r['error']}")
            continue
        colour = "red" if r["decision"] == "anomalous" else "green"
        table.add_row(
            r["path"],
            f"{r['image_score']:.4f}",
            f"{r['detection_score']:.4f}",
            f"[{colour}]{r['decision']}[/]",
        )
    console = Console()
    console.print(table)
    console.print(f"scores: {out / 'scores.csv'}  heat maps: {out / 'heatmaps'}")


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
    inputs, bad = _check_images(inputs, size, resample, skip_bad)
    skipped += bad
    if not inputs:
        raise DZADInputError(paths[0], "none of the given paths holds a readable image")
    rows: list[dict[str, Any]] = []
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
                        "heatmap": _write_image_outputs(item, out, maps[k], save_maps),
                        "error": None,
                    }
                )
            prog.advance(task, len(batch))
    rows += skipped
    columns = ["path", "image_score", "detection_score", "decision", "heatmap", "error"]
    table = pd.DataFrame.from_records(rows, columns=columns)
    atomic_write_text(out / "scores.csv", table.to_csv(index=False))
    if json_out:
        print(json.dumps({"model": model, "out": str(out), "threshold": threshold, "rows": rows}))
    else:
        _print_scores(rows, out, threshold)


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
) -> None:
    """The paper's protocol on every category under --data: metrics, scores, figures."""
    from dzad.evaluation import build_controls, category_samples, evaluate, source_batches

    dzad = load_model(model, random_backbone)
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
        _print_metrics(result, out)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _print_metrics(result: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="DZAD evaluation (controls labelled)", caption="all metrics: metrics.json")
    metrics = ("image_auroc", "pixel_auroc", "aupro")
    table.add_column("method", overflow="fold", max_width=26)
    table.add_column("category", overflow="fold", max_width=18)
    for m in metrics:
        table.add_column(m.replace("_", " "), justify="right", min_width=6)
    blocks = [("DZAD", result)] + [(v["label"], v) for v in result["controls"].values()]
    for label, block in blocks:
        for cat, vals in [*block["categories"].items(), ("mean", block["mean"])]:
            table.add_row(label, cat, *(_fmt(vals.get(m)) for m in metrics))
    console = Console()
    console.print(table)
    for cat, why in result["skipped"]["categories"].items():
        console.print(f"[yellow]skipped[/] {cat}: {why}")
    for cat, reasons in result["skipped"]["metrics"].items():
        for why in sorted(set(reasons.values())):
            names = ", ".join(m for m, r in reasons.items() if r == why)
            console.print(f"[yellow]undefined[/] {cat} {names}: {why}")
    console.print(f"metrics: {out / 'metrics.json'}")
