"""Report tables (the paper's layouts) as Markdown / CSV, and figures.

Inputs are plain ``metrics.json``-like mappings, one per run (seed)::

    {"categories": {cat: {metric: value}}, "mean": {...},
     "controls": {name: {"categories": {cat: {metric: value}}, "mean": {...}}}}

Where several seeds are given (a sequence of such mappings) every cell is mean ± std over seeds
(sample std, ddof 1). Mean rows are recomputed here as the macro mean over categories (NaN
categories skipped) per seed, then averaged over seeds. Control columns/rows are labelled
``control: <name>`` so no table shows a DZAD number without the simple baselines beside it.
Figures (ROC and precision-recall curves, Table-4 bars, the best/worst heat-map grid) use
matplotlib's ``Figure`` directly (Agg canvas, no pyplot state); every file is written atomically.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dzad.io_utils import atomic_path, atomic_write_text
from dzad.metrics import image_metrics

Result = Mapping[str, Any]
Runs = Mapping[str, Result | Sequence[Result]]  # column/row label -> one result per seed
TABLE3_MARKS = ("SD", "SGSD", "M_t", "F_b", "w_t")
MEAN_ROW = "mean"


@dataclass(frozen=True)
class Table:
    """Numbers ``mean`` (rows x columns), ``std`` over seeds (None with one seed), optional
    check-mark columns ``marks`` (booleans, shown first)."""

    mean: pd.DataFrame
    std: pd.DataFrame | None = None
    marks: pd.DataFrame | None = None

    def cell(self, row: str, column: str, digits: int = 3) -> str:
        m = self.mean.loc[row, column]
        if m is None or math.isnan(m):
            return "n/a"
        s = math.nan if self.std is None else self.std.loc[row, column]
        return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"

    def to_markdown(self, digits: int = 3) -> str:
        marks = [] if self.marks is None else list(self.marks.columns)
        header = [self.mean.index.name or "", *marks, *map(str, self.mean.columns)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.mean.index:
            ticks = ["✓" if self.marks.loc[row, c] else "" for c in marks]
            cells = [self.cell(row, c, digits) for c in self.mean.columns]
            lines.append("| " + " | ".join([str(row), *ticks, *cells]) + " |")
        return "\n".join(lines) + "\n"

    def to_frame(self) -> pd.DataFrame:
        """One numeric frame: marks, then each column, then ``<column> std`` columns if any."""
        parts = [] if self.marks is None else [self.marks]
        parts.append(self.mean)
        if self.std is not None:
            parts.append(self.std.add_suffix(" std"))
        return pd.concat(parts, axis=1)

    def to_csv(self) -> str:
        return self.to_frame().to_csv(float_format="%.6g")

    def write(self, folder: str | Path, stem: str, digits: int = 3) -> tuple[Path, Path]:
        """``folder/stem.md`` and ``folder/stem.csv``, each written atomically."""
        folder = Path(folder)
        md = atomic_write_text(folder / f"{stem}.md", self.to_markdown(digits))
        csv = atomic_write_text(folder / f"{stem}.csv", self.to_csv())
        return md, csv


def _seeds(results: Result | Sequence[Result]) -> list[Result]:
    return [results] if isinstance(results, Mapping) else list(results)


def _categories(result: Result, where: str) -> Mapping[str, Mapping[str, float]]:
    if "categories" not in result:
        raise ValueError(f"{where}: a result needs a 'categories' mapping")
    return result["categories"]


def _per_seed(results: Sequence[Result], metric: str, where: str) -> pd.DataFrame:
    """Seeds x (categories..., mean) values of one metric; mean = NaN-skipping macro mean."""
    rows = []
    for r in results:
        # undefined metrics are NaN in memory and null in metrics.json (read back as None)
        values = {
            c: math.nan if v.get(metric) is None else float(v[metric])
            for c, v in _categories(r, where).items()
        }
        finite = [v for v in values.values() if not math.isnan(v)]
        values[MEAN_ROW] = float(np.mean(finite)) if finite else math.nan
        rows.append(values)
    return pd.DataFrame(rows, dtype=float)


def _columns(runs: Runs, controls: bool) -> dict[str, list[Result]]:
    """Label -> per-seed results: the runs, then each control (from the first run that has it)."""
    cols = {label: _seeds(results) for label, results in runs.items()}
    if controls:
        for results in list(cols.values()):
            for r in results:
                for name in r.get("controls", {}):
                    label = name if name.startswith("control: ") else f"control: {name}"
                    if label not in cols:
                        cols[label] = [
                            s["controls"][name] for s in results if name in s.get("controls", {})
                        ]
    return cols


def _first_seen(keys: Iterable[Iterable[str]]) -> list[str]:
    order: list[str] = []
    for group in keys:
        order += [k for k in group if k not in order]
    return order


def _mean_std(per_column: dict[str, pd.DataFrame], index_name: str) -> Table:
    """Per column a seeds x rows frame -> rows x columns mean / std frames (rows in input order)."""
    rows = _first_seen(v.columns for v in per_column.values())
    mean = pd.DataFrame({k: v.mean(skipna=True) for k, v in per_column.items()}).reindex(rows)
    std = pd.DataFrame({k: v.std(ddof=1) for k, v in per_column.items()}).reindex(rows)
    mean.index.name = std.index.name = index_name
    several = any(len(v) > 1 for v in per_column.values())
    return Table(mean, std if several else None)


def auroc_table(runs: Runs, metric: str = "image_auroc", controls: bool = True) -> Table:
    """Paper layout: one row per category plus a ``mean`` row; one column per run label (DZAD
    configurations), then ``control: ...`` columns. Cells: ``metric`` mean ± std over seeds."""
    per_column = {
        label: _per_seed(results, metric, label)
        for label, results in _columns(runs, controls).items()
    }
    order = [c for c in _first_seen(v.columns for v in per_column.values()) if c != MEAN_ROW]
    per_column = {k: v.reindex(columns=[*order, MEAN_ROW]) for k, v in per_column.items()}
    return _mean_std(per_column, "category")


def summary_table(
    runs_by_target: Mapping[str, Runs],
    metrics: Sequence[str] = ("image_auroc", "pixel_auroc", "aupro"),
    controls: bool = True,
) -> Table:
    """Real-image study layout: one row per DZAD configuration and per control; columns
    ``<target>: <metric>``: macro mean over the target's categories (± std over seeds)."""
    means: dict[str, dict[str, float]] = {}
    stds: dict[str, dict[str, float]] = {}
    several = False
    for target, runs in runs_by_target.items():
        for label, results in _columns(runs, controls).items():
            for metric in metrics:
                column = f"{target}: {metric}"
                values = _per_seed(results, metric, label)[MEAN_ROW]
                several |= len(values) > 1
                means.setdefault(column, {})[label] = float(values.mean(skipna=True))
                stds.setdefault(column, {})[label] = float(values.std(ddof=1))
    rows = _first_seen(column.keys() for column in means.values())
    mean, std = pd.DataFrame(means).reindex(rows), pd.DataFrame(stds).reindex(rows)
    mean.index.name = std.index.name = "method"
    return Table(mean, std if several else None)


def ablation_table(
    rows: Sequence[tuple[Mapping[str, bool], Result | Sequence[Result]]],
    cls_metric: str = "image_auroc",
    seg_metric: str = "pixel_auroc",
) -> Table:
    """Table 3: check marks SD / SGSD / M_t / F_b / w_t, then ``cls`` and ``seg`` (macro means)."""
    marks, per_column = [], {"cls": [], "seg": []}
    labels = []
    for flags, results in rows:
        unknown = set(flags) - set(TABLE3_MARKS)
        if unknown:
            raise ValueError(f"unknown Table-3 flag(s) {sorted(unknown)}; known: {TABLE3_MARKS}")
        label = "+".join(m for m in TABLE3_MARKS if flags.get(m)) or "none"
        if label in labels:
            raise ValueError(f"two Table-3 rows with the same flags {label!r}")
        labels.append(label)
        marks.append({m: bool(flags.get(m, False)) for m in TABLE3_MARKS})
        seeds = _seeds(results)
        per_column["cls"].append(_per_seed(seeds, cls_metric, label)[MEAN_ROW])
        per_column["seg"].append(_per_seed(seeds, seg_metric, label)[MEAN_ROW])
    frames = {k: pd.concat(v, axis=1, keys=labels) for k, v in per_column.items()}
    table = _mean_std(frames, "configuration")
    marks_frame = pd.DataFrame(marks, index=table.mean.index)
    return Table(table.mean, table.std, marks_frame)


def weighting_table(
    results: Mapping[str, Mapping[str, Result | Sequence[Result]]], metric: str = "image_auroc"
) -> Table:
    """Table 4: rows = weight functions, columns = target datasets, cells = macro ``metric``.

    ``results[weight_function][target]`` is one result or one per seed.
    """
    targets = _first_seen(results.values())
    frames = {}
    for target in targets:
        series = {
            wf: _per_seed(_seeds(by_target[target]), metric, f"{wf}/{target}")[MEAN_ROW]
            for wf, by_target in results.items()
            if target in by_target
        }
        frames[target] = pd.concat(series.values(), axis=1, keys=series.keys())
    return _mean_std(frames, "weight function")


def plot_roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = ""
) -> Path:
    """One ROC curve per category from ``{category: (labels (n,), scores (n,))}``; PNG, atomic.

    Categories with a single class have no curve and are named in the legend as skipped.
    """
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for category, (labels, scores) in curves.items():
        labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
        if labels.min() == labels.max():
            ax.plot([], [], " ", label=f"{category}: skipped (one class)")
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        auroc = image_metrics(labels, scores)["image_auroc"]
        ax.plot(fpr, tpr, lw=1.4, label=f"{category} (AUROC {auroc:.3f})")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = ""
) -> Path:
    """Precision-recall curves (step, as average precision sums them) from ``{name: (labels (n,),
    scores (n,))}``, the defect rate as the chance line; PNG, atomic. One-class entries skipped."""
    from matplotlib.figure import Figure
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    for name, (labels, scores) in curves.items():
        labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
        if labels.min() == labels.max():
            ax.plot([], [], " ", label=f"{name}: skipped (one class)")
            continue
        precision, recall, _ = precision_recall_curve(labels, scores)
        ap = average_precision_score(labels, scores)
        ax.step(recall, precision, where="post", lw=1.4, label=f"{name} (AP {ap:.3f})")
    if curves:
        rate = float(np.mean(np.asarray(next(iter(curves.values()))[0])))
        ax.axhline(rate, color="grey", lw=0.8, ls="--", label=f"chance ({rate:.2f})")
    ax.set(xlabel="recall", ylabel="precision", title=title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_weighting_bars(table: Table, path: str | Path, ylabel: str = "image AUROC") -> Path:
    """Grouped bars of a :func:`weighting_table` (one group per weight function), std as error."""
    from matplotlib.figure import Figure

    mean = table.mean
    n_rows, n_cols = mean.shape
    fig = Figure(figsize=(max(6, 0.9 * n_rows), 4))
    ax = fig.subplots()
    width = 0.8 / max(1, n_cols)
    x = np.arange(n_rows)
    for j, column in enumerate(mean.columns):
        err = None if table.std is None else table.std[column].fillna(0).to_numpy()
        ax.bar(x + (j - (n_cols - 1) / 2) * width, mean[column], width, yerr=err, label=column)
    ax.set_xticks(x, [str(i) for i in mean.index], rotation=30, ha="right")
    ax.set(ylabel=ylabel)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


@dataclass(order=True)
class _Shown:
    key: float
    image: np.ndarray = field(compare=False)
    map: np.ndarray = field(compare=False)
    mask: np.ndarray = field(compare=False)
    name: str = field(compare=False)


class Extremes:
    """Keeps the ``k`` highest- and lowest-scoring images (small copies) for the heat-map grid."""

    def __init__(self, k: int) -> None:
        self.k, self.high, self.low = k, [], []

    def add(self, score: float, image, m, mask, name: str) -> None:
        for heap, key in ((self.high, score), (self.low, -score)):
            item = _Shown(key, image, m, mask, name)
            if len(heap) < self.k:
                heapq.heappush(heap, item)
            elif key > heap[0].key:
                heapq.heapreplace(heap, item)

    def plot(self, path: Path, title: str, threshold: float | None = None) -> Path:
        """Both rows on one colour scale (:class:`dzad.panels.MapScale`: clear below the map
        ``threshold`` when given, up to the highest value shown), with its colour bar."""
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure

        from dzad.panels import MapScale, blend

        rows = [sorted(self.high, reverse=True), sorted(self.low, reverse=True)]
        cols = max(len(r) for r in rows)
        shown = [it.map for r in rows for it in r]
        low, high = min(float(m.min()) for m in shown), max(float(m.max()) for m in shown)
        scale = MapScale.of_run(threshold, low, high)
        fig = Figure(figsize=(2.2 * cols + 0.8, 4.8))
        axes = fig.subplots(2, cols, squeeze=False)
        bar = ScalarMappable(Normalize(scale.bottom, scale.top), colormaps["inferno"])
        fig.colorbar(bar, ax=axes, fraction=0.03, label="map value")
        for r, (items, what) in enumerate(zip(rows, ("highest", "lowest"), strict=True)):
            for c in range(cols):
                ax = axes[r][c]
                ax.axis("off")
                if c >= len(items):
                    continue
                it = items[c]
                ax.imshow(blend(it.image, it.map, scale))
                if it.mask.any():
                    ax.contour(it.mask, levels=[0.5], colors="cyan", linewidths=0.8)
                ax.set_title(f"{what}: {abs(it.key):.3g}\n{it.name}", fontsize=7)
        fig.suptitle(title, fontsize=9)
        return _save(fig, path, dpi=110)


def _save(fig, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    return path
