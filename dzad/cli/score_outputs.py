"""What ``dzad score`` and ``dzad evaluate`` print, and ``dzad score``'s raw maps.

:func:`save_raw_map` writes one image's raw map atomically;
:func:`print_scores` and :func:`print_metrics` print the commands' tables (Rich).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dzad.cli.score_inputs import ScoreInput

_TABLE_ROWS = 30


def save_raw_map(item: ScoreInput, out: Path, score_map) -> None:
    """``maps/<name>.npy``: one image's raw anomaly map ``(h, w)`` float32, written atomically."""
    import numpy as np

    from dzad.io_utils import atomic_path

    with atomic_path(out / "maps" / item.rel.with_name(item.rel.name + ".npy")) as tmp:
        np.save(tmp, score_map.astype(np.float32))


def print_scores(rows: list[dict[str, Any]], out: Path, threshold: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from dzad.html_report import relative_paths

    scored = sorted(
        (r for r in rows if r["decision"] != "skipped"), key=lambda r: -r["image_score"]
    )
    shown = scored[:_TABLE_ROWS] + [r for r in rows if r["decision"] == "skipped"]
    caption = f"{len(scored)} scored, {len(rows) - len(scored)} skipped; threshold {threshold}"
    if len(scored) > _TABLE_ROWS:
        caption += f"; top {_TABLE_ROWS} by image score shown, all rows in scores.csv"
    names, common = relative_paths([r["path"] for r in shown])
    table = Table(title=f"DZAD scores: {common}", caption=caption)
    table.add_column("path", no_wrap=True, overflow="ellipsis", min_width=12)
    for col in ("image", "detect.", "norm.", "decision"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, r in zip(names, shown, strict=True):
        if r["decision"] == "skipped":
            table.add_row(name, "-", "-", "-", f"[yellow]skipped[/]: {r['error']}")
            continue
        colour = "red" if r["decision"] == "anomalous" else "green"
        norm, detection = r.get("normalised_score"), r["detection_score"]
        table.add_row(
            name,
            f"{r['image_score']:.4f}",
            "-" if detection is None else f"{detection:.4f}",  # None: a regime's row
            "-" if norm is None else f"{norm:.2f}",
            f"[{colour}]{r['decision']}[/]",
        )
    console = Console()
    console.print(table)
    console.print(f"scores: {out / 'scores.csv'}  report: {out / 'report.html'}")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def print_metrics(result: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    regime = result.get("regime", "zero-shot")
    title = f"DZAD evaluation, regime: {regime} (controls labelled)"
    table = Table(title=title, caption="all metrics: metrics.json")
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
    console.print(f"metrics: {out / 'metrics.json'}  report: {out / 'report.html'}")
