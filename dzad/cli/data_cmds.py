"""Data commands: ``dzad synth``, ``dzad fetch``, ``dzad convert``, ``dzad preprocess``.

Each is a thin edge over :mod:`dzad.data`; defaults come from :class:`~dzad.config.SynthConfig` and
:class:`~dzad.config.DataConfig`. Bad input ends with one ``error: <file>: <reason>`` line, exit 2.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from dzad.cli._app import app, clean_errors
from dzad.config import DataConfig, SynthConfig

_SYNTH = SynthConfig()
_DATA = DataConfig()


class FetchName(StrEnum):
    mvtec = "mvtec"
    visa = "visa"
    btad = "btad"


class ConvertFormat(StrEnum):
    visa = "visa"
    btad = "btad"


class Resample(StrEnum):
    bilinear = "bilinear"
    bicubic = "bicubic"


def _report(result) -> None:
    for cat, c in result.counts.items():
        typer.echo(
            f"{cat}: train {c.train_good} good, test {c.test_good} good / {c.test_defect} defect"
        )
    typer.echo(f"dataset: {result.dest}")
    typer.echo(f"split sha256: {result.split_sha256}")


@app.command("synth")
@clean_errors
def synth_cmd(
    dest: Path = typer.Option(Path(_SYNTH.dest), help="Output folder (one sub-folder per family)."),
    seed: int = typer.Option(_SYNTH.seed),
    size: int = typer.Option(_SYNTH.size, help="Image side in pixels."),
    n_train: int = typer.Option(_SYNTH.n_train, help="Normal training images per category."),
    n_test_good: int = typer.Option(_SYNTH.n_test_good, help="Normal test images per category."),
    n_test_defect: int = typer.Option(_SYNTH.n_test_defect, help="Defect images per category."),
    family: list[str] = typer.Option(list(_SYNTH.families), help="Families to write (repeat)."),
) -> None:
    """Write the synthetic two-family dataset (MVTec layout), deterministic for a seed."""
    from dzad.data.synth import generate

    written = generate(dest, seed, size, n_train, n_test_good, n_test_defect, tuple(family))
    for fam, cats in written.items():
        typer.echo(f"{dest / fam}: {', '.join(cats)}")


@app.command("fetch")
@clean_errors
def fetch_cmd(
    name: FetchName = typer.Argument(..., help="Which benchmark."),
    dest: Path = typer.Option(..., help="Folder for the archive and the extracted dataset."),
    archive: Path | None = typer.Option(None, help="Use this archive instead of downloading."),
    sha256: str | None = typer.Option(None, help="Expected SHA-256 (overrides the table)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Do not check the SHA-256."),
    no_check_counts: bool = typer.Option(False, "--no-check-counts", help="Skip count check."),
    keep_raw: bool = typer.Option(False, "--keep-raw", help="Keep the extracted release."),
    timeout: float = typer.Option(10.0, help="Seconds to wait for the server."),
) -> None:
    """Download, verify, safely extract (and convert) MVTec AD, VisA or BTAD."""
    from dzad.data.fetch import fetch

    result = fetch(
        name.value,
        dest,
        archive=archive,
        sha256=sha256,
        no_verify=no_verify,
        check_counts=not no_check_counts,
        keep_raw=keep_raw,
        timeout=timeout,
    )
    _report(result)


@app.command("convert")
@clean_errors
def convert_cmd(
    fmt: ConvertFormat = typer.Argument(..., help="Source release format."),
    src: Path = typer.Argument(..., help="Extracted release folder."),
    dest: Path = typer.Argument(..., help="Output folder (MVTec layout)."),
    no_check_counts: bool = typer.Option(False, "--no-check-counts", help="Skip count check."),
) -> None:
    """Convert an extracted VisA or BTAD release to the MVTec layout; print counts and hash."""
    from dzad.data import convert

    fn = convert.convert_visa if fmt is ConvertFormat.visa else convert.convert_btad
    table = convert.VISA_COUNTS if fmt is ConvertFormat.visa else convert.BTAD_COUNTS
    _report(fn(src, dest, None if no_check_counts else table))


@app.command("preprocess")
@clean_errors
def preprocess_cmd(
    data: Path = typer.Option(..., help="Dataset root (MVTec layout)."),
    out: Path = typer.Option(Path(_DATA.cache_dir), help="Cache folder (an MVTec-layout root)."),
    categories: list[str] = typer.Option([], help="Categories (repeat or comma-separate)."),
    size: int = typer.Option(_DATA.image_size, help="Cached image side in pixels."),
    resample: Resample = typer.Option(Resample(_DATA.resample)),
    mask_threshold: int = typer.Option(_DATA.mask_threshold, help="Mask pixel > this is defect."),
    skip_bad: bool = typer.Option(_DATA.skip_bad, help="Log and skip unreadable files."),
) -> None:
    """Resize a dataset into a PNG cache plus manifest; a re-run on unchanged input does nothing."""
    from dzad.data.preprocess import MANIFEST, preprocess

    cats = [c for item in categories for c in item.split(",") if c]
    table = preprocess(data, cats, out, size, resample.value, mask_threshold, skip_bad=skip_bad)
    typer.echo(f"{out / MANIFEST}: {len(table)} images")
