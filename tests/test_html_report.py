"""report.html of `dzad score` / `dzad evaluate` rendered in a real headless browser (chromium).

.ci/run installs Debian's chromium when it is missing; the tests skip only where no chromium is
installed. The page is loaded from the output folder (file://, offline); its inline script must
sort the rows (``#sort=...``), every relative link must resolve, and a screenshot is taken.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from dzad.cli import app
from dzad.html_report import relative_paths

runner = CliRunner()
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"]


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (.ci/run installs it: apt-get install chromium)")
    return exe


def _browser(exe: str, url: str, *args: str) -> str:
    run = subprocess.run(
        [exe, *_FLAGS, *args, url], capture_output=True, text=True, timeout=120, check=True
    )
    return run.stdout


def _rows(dom: str) -> list[list[str]]:
    """Cell texts of the image table's rows, in the order the browser shows them."""
    body = dom.split('<table id="images">', 1)[1]
    rows = re.findall(r'<tr class="row">(.*?)</tr>', body, flags=re.S)
    return [
        [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", r)] for r in rows
    ]


def _check_links(html: str, folder: Path) -> list[str]:
    links = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert links and not [u for u in links if "://" in u]  # offline: relative links only
    for u in links:
        assert (folder / u).is_file(), u
    return links


def _screenshot(exe: str, page: Path, shot: Path) -> np.ndarray:
    _browser(exe, page.as_uri(), f"--screenshot={shot}", "--window-size=1200,900")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (900, 1200) and pixels.std() > 10  # something was rendered
    return pixels


@pytest.mark.slow
def test_score_report_lists_and_sorts_the_rows(chromium, synth_root, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    paths = [synth_root / "grain" / "test" / "good", synth_root / "weave" / "test" / "hole"]
    result = runner.invoke(
        app, ["score", *map(str, paths), "-m", str(tiny_checkpoint), "-o", str(out), "--pictures"]
    )
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(out / "scores.csv")
    page = out / "report.html"
    _check_links(page.read_text(), out)
    for order in ("asc", "desc"):
        dom = _browser(chromium, f"{page.as_uri()}#sort=image_score,{order}", "--dump-dom")
        rows = _rows(dom)
        assert len(rows) == len(scores) == 6
        shown = [float(r[1]) for r in rows]  # path | image score | ...
        assert shown == sorted(shown, reverse=order == "desc")
        assert sorted(r[0] for r in rows) == sorted(relative_paths(list(scores["path"]))[0])
    assert "grain/test/good/000.png" in {r[0] for r in rows}  # relative to the inputs' folder
    _screenshot(chromium, page, tmp_path / "score.png")


@pytest.mark.slow
def test_evaluate_report_has_metrics_figures_and_rows(
    chromium, synth_root, tiny_checkpoint, tmp_path
):
    out = tmp_path / "ev"
    args = ["evaluate", "-m", str(tiny_checkpoint), "--data", str(synth_root), "-o", str(out)]
    args += ["--categories", "grain", "--no-controls", "--max-images", "6"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    links = _check_links(html, out)
    assert {"figures/grain_roc.png", "figures/grain_pr.png"} <= set(links)
    dom = _browser(chromium, f"{(out / 'report.html').as_uri()}#sort=category,asc", "--dump-dom")
    rows = _rows(dom)
    scores = pd.read_csv(out / "scores.csv")
    assert len(rows) == len(scores) == 6
    assert sorted(r[1] for r in rows) == sorted(scores["defect"])  # category | defect | path ...
    assert "image auroc" in dom and "DZAD" in dom
    _screenshot(chromium, out / "report.html", tmp_path / "evaluate.png")
