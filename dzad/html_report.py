"""One static HTML page per ``dzad score`` / ``dzad evaluate`` run: ``<out>/report.html``.

The page opens offline from the output folder: every link is relative (thumbnails, panels, figures)
and the only script is a few inline lines that sort the image table by a clicked column (numbers
numerically; a second click reverses). ``report.html#sort=<column>,<asc|desc>`` opens it sorted.
Rows start sorted by score, highest first. Written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dzad.io_utils import atomic_write_text

_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:middle}
td.t,th.t{text-align:left}
th[data-col]{cursor:pointer;background:#f0f0f0}
th[data-col]:after{content:" \\2195";color:#888}
.anomalous{color:#c00000;font-weight:bold}.normal{color:#007000}.skipped{color:#a07000}
img.thumb{height:90px}
figure{display:inline-block;margin:0 1em 1em 0}figure img{max-width:360px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 1em}dt{font-weight:bold}
"""

# Sort the table of the clicked header by that column; data-v holds a cell's sortable value.
_SCRIPT = """
function sortBy(th, dir) {
  const body = th.closest('table').tBodies[0], i = th.cellIndex;
  const key = r => { const v = r.cells[i].dataset.v ?? r.cells[i].textContent;
                     const n = Number(v); return v !== '' && !isNaN(n) ? n : v; };
  const rows = [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    return (typeof x === typeof y ? (x > y) - (x < y) : typeof x === 'number' ? -1 : 1) * dir; });
  rows.forEach(r => body.appendChild(r));
  th.dataset.dir = dir;
}
document.querySelectorAll('th[data-col]').forEach(th => th.addEventListener('click',
  () => sortBy(th, th.dataset.dir === '-1' ? 1 : -1)));
const m = /sort=([^,&]+),(asc|desc)/.exec(location.hash);
const th = m && document.querySelector(`th[data-col="${m[1]}"]`);
if (th) sortBy(th, m[2] === 'asc' ? 1 : -1);
"""


def relative_paths(paths: Sequence[str]) -> tuple[list[str], str]:
    """Paths relative to their common folder, and that folder (narrow tables); the folder itself
    is relative to the working directory when it lies inside it."""
    if not paths:
        return [], ""
    absolute = [os.path.abspath(p) for p in paths]
    common = os.path.commonpath([os.path.dirname(p) for p in absolute])
    here = os.getcwd()
    shown = os.path.relpath(common, here) if common.startswith(here + os.sep) else common
    return [os.path.relpath(p, common) for p in absolute], shown


def _short_paths(
    rows: Sequence[Mapping[str, Any]], settings: Mapping[str, str]
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Rows with paths relative to their common folder; the settings name that folder."""
    names, common = relative_paths([str(r["path"]) for r in rows])
    short = [{**r, "path": n} for r, n in zip(rows, names, strict=True)]
    return short, {**settings, "paths relative to": common}


def _href(rel: str) -> str:
    return quote(rel, safe="/")


def _number(v: Any, digits: int = 4) -> tuple[str, str]:
    """(shown text, sort value) of a score; missing -> ("-", "-Infinity")."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-", "-Infinity"
    return f"{float(v):.{digits}f}", repr(float(v))


def _settings(settings: Mapping[str, str]) -> str:
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in settings.items())
    return f"<dl>{items}</dl>"


def _image_table(
    rows: Sequence[Mapping[str, Any]], text: Sequence[str], numbers: Sequence[str]
) -> str:
    """Table of per-image rows: text columns, score columns, decision, panel thumbnail."""
    head = "".join(f'<th class="t" data-col="{c}">{escape(c)}</th>' for c in text)
    head += "".join(f'<th data-col="{c}">{escape(c.replace("_", " "))}</th>' for c in numbers)
    head += '<th class="t" data-col="decision">decision</th><th class="t">panel</th>'
    body = []
    for r in rows:
        cells = [f'<td class="t">{escape(str(r.get(c, "")))}</td>' for c in text]
        for c in numbers:
            shown, value = _number(r.get(c))
            cells.append(f'<td data-v="{value}">{shown}</td>')
        decision = str(r.get("decision", ""))
        note = f": {escape(str(r['error']))}" if r.get("error") else ""
        cells.append(f'<td class="t {escape(decision)}">{escape(decision)}{note}</td>')
        thumb, full = r.get("thumb"), r.get("panel")
        pic = (
            f'<a href="{_href(full)}"><img class="thumb" loading="lazy" alt="panel" '
            f'src="{_href(thumb)}"></a>'
            if thumb and full
            else ""
        )
        cells.append(f'<td class="t">{pic}</td>')
        body.append(f'<tr class="row">{"".join(cells)}</tr>')
    return f"<table id=images><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _sorted(rows: Sequence[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
    def k(r: Mapping[str, Any]) -> float:
        v = r.get(key)
        return -math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    return sorted(rows, key=k, reverse=True)


def _page(title: str, sections: Sequence[str]) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}'
        f"</title><style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>"
        + "".join(sections)
        + f"<script>{_SCRIPT}</script></body></html>\n"
    )


def _counts(rows: Sequence[Mapping[str, Any]]) -> str:
    n = {d: sum(r.get("decision") == d for r in rows) for d in ("anomalous", "normal", "skipped")}
    return f"<p>{len(rows)} images: " + ", ".join(f"{v} {k}" for k, v in n.items()) + "</p>"


def write_score_report(
    out: Path, rows: Sequence[Mapping[str, Any]], settings: Mapping[str, str]
) -> Path:
    """``out/report.html`` for ``dzad score``: settings, counts, the image table."""
    rows, settings = _short_paths(rows, settings)
    table = _image_table(
        _sorted(rows, "image_score"),
        ["path"],
        ["image_score", "detection_score", "normalised_score"],
    )
    page = _page("DZAD scores", [_settings(settings), _counts(rows), table])
    return atomic_write_text(Path(out) / "report.html", page)


def _metrics_table(result: Mapping[str, Any]) -> str:
    metrics = ("image_auroc", "pixel_auroc", "aupro")
    head = '<th class="t">method</th><th class="t">category</th>'
    head += "".join(f"<th>{m.replace('_', ' ')}</th>" for m in metrics)
    blocks = [("DZAD", result)] + [(v["label"], v) for v in result.get("controls", {}).values()]
    body = []
    for label, block in blocks:
        for cat, vals in [*block["categories"].items(), ("mean", block["mean"])]:
            cells = "".join(f"<td>{_number(vals.get(m), 3)[0]}</td>" for m in metrics)
            names = f'<td class="t">{escape(label)}</td><td class="t">{escape(cat)}</td>'
            body.append(f"<tr>{names}{cells}</tr>")
    rows = "".join(body)
    return f"<h2>Metrics</h2><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def write_evaluate_report(
    out: Path,
    rows: Sequence[Mapping[str, Any]],
    result: Mapping[str, Any],
    figures: Sequence[str],
    settings: Mapping[str, str],
) -> Path:
    """``out/report.html`` for ``dzad evaluate``: settings, metrics, figures (relative paths),
    the image table (category, path, label, scores, decision, panel)."""
    rows, settings = _short_paths(rows, settings)
    figs = "".join(
        f'<figure><a href="{_href(f)}"><img src="{_href(f)}" alt="{escape(f)}"></a>'
        f"<figcaption>{escape(f)}</figcaption></figure>"
        for f in figures
    )
    table = _image_table(
        _sorted(rows, "image_score"),
        ["category", "defect", "path"],
        ["image_score", "detection_score", "normalised_score"],
    )
    sections = [_settings(settings), _metrics_table(result), f"<h2>Figures</h2>{figs}"]
    sections += ["<h2>Images</h2>", _counts(rows), table]
    return atomic_write_text(Path(out) / "report.html", _page("DZAD evaluation", sections))
