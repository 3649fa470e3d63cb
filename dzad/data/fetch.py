"""Download, verify and safely extract the public benchmark archives, then convert them.

One table, :data:`DATASETS`, holds the official URL and SHA-256 of every archive. The checksums are
those recorded by anomalib's ``DownloadInfo`` for the same URLs; they could not be recomputed here
(no network), so ``sha256_source`` says where each one comes from. A spec without a checksum is
never trusted silently: :func:`fetch` prints the computed SHA-256 and needs ``no_verify=True``.

Downloads go to ``<file>.part`` and resume with an HTTP ``Range`` request; the file gets its final
name only after the checksum matches (a mismatch removes the ``.part``). Extraction refuses absolute
paths, ``..``, every symlink and hardlink and special files before writing anything (dataset
archives need no links), checks the extracted tree again and builds the folder under a temporary
name, so a failure leaves no partial folder.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dzad.data.convert import (
    BTAD_COUNTS,
    VISA_COUNTS,
    ConvertResult,
    convert_btad,
    convert_visa,
    split_digest,
)
from dzad.errors import DZADInputError
from dzad.io_utils import atomic_dir, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    url: str
    filename: str
    sha256: str | None
    sha256_source: str
    fmt: str  # "mvtec" (already in MVTec layout) | "visa" | "btad" (converted)
    homepage: str


_ANOMALIB = "anomalib DownloadInfo for this URL (not recomputed here)"
DATASETS: dict[str, DatasetSpec] = {
    "mvtec": DatasetSpec(
        "mvtec",
        "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
        "420938113-1629952094/mvtec_anomaly_detection.tar.xz",
        "mvtec_anomaly_detection.tar.xz",
        "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        _ANOMALIB,
        "mvtec",
        "https://www.mvtec.com/company/research/datasets/mvtec-ad",
    ),
    "visa": DatasetSpec(
        "visa",
        "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
        "VisA_20220922.tar",
        "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
        _ANOMALIB,
        "visa",
        "https://github.com/amazon-science/spot-diff",
    ),
    "btad": DatasetSpec(
        "btad",
        "https://avires.dimi.uniud.it/papers/btad/btad.zip",
        "btad.zip",
        "461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
        _ANOMALIB,
        "btad",
        "https://avires.dimi.uniud.it/papers/btad/",
    ),
}
_DOWNLOAD_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError)


class CorruptArchive(DZADInputError):
    """The archive cannot be read (truncated or damaged), as opposed to one with unsafe members."""


def _interrupted(dest: Path, part: Path, why: str, hint: str) -> DZADInputError:
    size = part.stat().st_size if part.exists() else 0
    return DZADInputError(
        dest, f"download interrupted after {size} bytes ({why}); run again to resume. {hint}"
    )


def download(
    url: str, dest: str | Path, sha256: str | None, *, timeout: float = 10.0, hint: str = ""
) -> Path:
    """Fetch ``url`` to ``dest`` (resuming ``dest.part``), check ``sha256`` if given; return it.

    An existing ``dest`` is only verified. ``timeout`` bounds connecting and every read, so a
    machine without network fails within seconds; ``hint`` is appended to every error message.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        _download_part(url, dest, part, timeout, hint)
    target = dest if dest.exists() else part
    if sha256 is not None:
        actual = sha256_file(target)
        if actual != sha256.lower():
            if target == part:
                part.unlink()
            what = "the partial download was removed" if target == part else "file kept"
            raise DZADInputError(
                dest, f"SHA-256 mismatch: expected {sha256}, got {actual} ({what}). {hint}"
            )
    if target == part:
        os.replace(part, dest)
    return dest


def _download_part(url: str, dest: Path, part: Path, timeout: float, hint: str) -> None:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "dzad-fetch"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the .part is already complete
            return
        raise DZADInputError(dest, f"download of {url} failed: HTTP {exc.code}. {hint}") from None
    except _DOWNLOAD_ERRORS as exc:
        reason = getattr(exc, "reason", exc)
        raise DZADInputError(dest, f"cannot download {url} ({reason}). {hint}") from None
    with resp:
        if offset and resp.status != 206:
            log.warning("%s: server ignored the Range request; downloading from the start", url)
            offset = 0
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with open(part, "ab" if offset else "wb") as fh:
            try:
                while block := resp.read(1 << 20):
                    fh.write(block)
            except _DOWNLOAD_ERRORS as exc:
                raise _interrupted(dest, part, str(exc), hint) from None
    if total is not None and part.stat().st_size != total:
        raise _interrupted(dest, part, f"expected {total} bytes", hint)


def _check_name(name: str, archive: Path) -> str:
    """Refuse absolute member names and ``..`` components (also those tar's filter would strip)."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or ".." in PurePosixPath(norm).parts:
        raise DZADInputError(archive, f"unsafe path in archive: {name!r}")
    return norm


def _refuse_link(name: str, kind: str, archive: Path) -> DZADInputError:
    return DZADInputError(
        archive, f"unsafe archive member refused: {name!r} is a {kind} (dataset archives hold none)"
    )


def _check_zip(zf: zipfile.ZipFile, archive: Path) -> None:
    """Every member a plain file or folder with a safe name; checked before anything is written."""
    for info in zf.infolist():
        _check_name(info.filename, archive)
        ftype = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix mode recorded (a plain file)
        if ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
            kind = "symlink" if ftype == stat.S_IFLNK else "special file"
            raise _refuse_link(info.filename, kind, archive)


def _check_tar(tf: tarfile.TarFile, archive: Path) -> None:
    """Every member a plain file or folder with a safe name; checked before anything is written.

    Links are refused here, so safety never rests on ``filter="data"`` alone (Python 3.11.7's
    filter is bypassed by a symlink chain longer than PATH_MAX, CVE-2025-4517).
    """
    for member in tf.getmembers():
        _check_name(member.name, archive)
        if member.issym() or member.islnk():
            raise _refuse_link(member.name, "symlink" if member.issym() else "hardlink", archive)
        if not (member.isfile() or member.isdir()):
            raise _refuse_link(member.name, "special file", archive)


def _check_tree(root: Path, archive: Path) -> None:
    """After extraction: no link anywhere and every path resolves inside ``root``."""
    top = root.resolve()
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink() or not path.resolve().is_relative_to(top):
                raise DZADInputError(archive, f"unsafe archive member refused: {name!r}")


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract a tar (any compression) or zip ``archive`` into ``dest``, refusing unsafe members.

    Absolute names, ``..``, symlinks, hardlinks and special files are refused before anything is
    written; the tree is checked again after extraction; a failure leaves no partial folder.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        with atomic_dir(dest) as tmp:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as zf:
                    _check_zip(zf, archive)
                    zf.extractall(tmp)
            elif tarfile.is_tarfile(archive):
                with tarfile.open(archive) as tf:
                    _check_tar(tf, archive)
                    tf.extractall(tmp, filter="data")
            else:
                raise CorruptArchive(archive, "not a tar or zip archive")
            _check_tree(tmp, archive)
    except tarfile.FilterError as exc:
        raise DZADInputError(archive, f"unsafe archive member refused ({exc})") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise CorruptArchive(archive, f"corrupt or truncated archive ({exc})") from None
    return dest


def _extract(path: Path, dest: Path, *, downloaded: bool) -> Path:
    """:func:`safe_extract`; a downloaded archive that cannot be extracted is removed, so the next
    run downloads it again instead of reusing a truncated file (``--no-verify`` checks nothing)."""
    try:
        return safe_extract(path, dest)
    except DZADInputError as exc:
        if not downloaded or not isinstance(exc, CorruptArchive):
            raise
        path.unlink(missing_ok=True)
        raise DZADInputError(
            path, f"{exc.reason}; the downloaded file was removed, run again to download it anew"
        ) from None


def _manual_hint(spec: DatasetSpec, dest: Path) -> str:
    return (
        f"Without network: download {spec.url} (see {spec.homepage}) elsewhere, then run "
        f"`dzad fetch {spec.name} --dest {dest} --archive PATH/{spec.filename}`."
    )


def fetch(
    dataset: str | DatasetSpec,
    dest: str | Path,
    *,
    archive: str | Path | None = None,
    sha256: str | None = None,
    no_verify: bool = False,
    check_counts: bool = True,
    keep_raw: bool = False,
    timeout: float = 10.0,
) -> ConvertResult:
    """Download (or take ``archive``), verify, extract and convert to the MVTec layout.

    Returns the MVTec-layout root with its per-category counts and split SHA-256.

    Layout under ``dest``: ``archives/<file>``, then ``mvtec/`` (MVTec AD as released) or
    ``visa/`` / ``btad/`` (converted; the extracted ``<name>-raw/`` is removed unless ``keep_raw``).
    ``sha256`` overrides the table's checksum.
    """
    if isinstance(dataset, str):
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
        dataset = DATASETS[dataset]
    spec, dest = dataset, Path(dest)
    hint = _manual_hint(spec, dest)
    expected = None if no_verify else (sha256 or spec.sha256)
    if archive is None:
        path = download(
            spec.url, dest / "archives" / spec.filename, expected, timeout=timeout, hint=hint
        )
    else:
        path = Path(archive)
        if not path.is_file():
            raise DZADInputError(path, "archive not found")
        if expected is not None and sha256_file(path) != expected.lower():
            raise DZADInputError(
                path, f"SHA-256 mismatch: expected {expected}, got {sha256_file(path)}"
            )
    if no_verify:
        log.warning("%s: checksum NOT verified (--no-verify)", path)
    elif expected is None:
        raise DZADInputError(
            path,
            f"no SHA-256 is recorded for {spec.name}; this file's SHA-256 is {sha256_file(path)}. "
            "Compare it with the publisher's, then rerun with --sha256 <hex> or --no-verify",
        )
    if spec.fmt == "mvtec":
        raw = _extract(path, dest / spec.name, downloaded=archive is None)
        subs = [p for p in raw.iterdir() if p.is_dir()]
        root = subs[0] if len(subs) == 1 and not (subs[0] / "train").is_dir() else raw
        counts, digest = split_digest(root)  # raises unless the archive held an MVTec tree
        return ConvertResult(root, counts, digest)
    raw = _extract(path, dest / f"{spec.name}-raw", downloaded=archive is None)
    convert = {"visa": (convert_visa, VISA_COUNTS), "btad": (convert_btad, BTAD_COUNTS)}
    fn, counts = convert[spec.fmt]
    result = fn(raw, dest / spec.name, counts if check_counts else None)
    log.info("%s: split SHA-256 %s", result.dest, result.split_sha256)
    if not keep_raw:
        shutil.rmtree(raw)
    return result
