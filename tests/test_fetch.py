"""Fetch through a real HTTP server on 127.0.0.1: resume, checksums, safe extraction, conversion."""

from __future__ import annotations

import hashlib
import io
import socket
import stat
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dzad.cli import app
from dzad.data.convert import SplitCounts
from dzad.data.fetch import DATASETS, DatasetSpec, download, fetch, safe_extract
from dzad.errors import DZADInputError


class _State:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.truncate_once: set[str] = set()
        self.ignore_range = False


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append((self.path, self.headers.get("Range")))
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start, wanted = 0, self.headers.get("Range")
            if wanted and not state.ignore_range:
                start = int(wanted.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            chunk = body[start:]
            self.send_header("Content-Length", str(len(chunk)))
            self.end_headers()
            if self.path in state.truncate_once:  # the connection drops half way
                state.truncate_once.discard(self.path)
                chunk = chunk[: len(chunk) // 2]
            self.wfile.write(chunk)

        def log_message(self, *args) -> None:
            pass

    return Handler


@pytest.fixture
def server():
    state = _State()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _btad_files() -> dict[str, bytes]:
    """A tiny BTAD release: ``01`` with 2 train, 1 test ok, 1 ko (+ mask)."""
    rng = np.random.default_rng(0)
    img = [_png(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(4)]
    mask = np.zeros((12, 12), np.uint8)
    mask[3:6, 3:6] = 255
    top = "BTech_Dataset_transformed/01"
    return {
        f"{top}/train/ok/0000.png": img[0],
        f"{top}/train/ok/0001.png": img[1],
        f"{top}/test/ok/0000.png": img[2],
        f"{top}/test/ko/0000.png": img[3],
        f"{top}/ground_truth/ko/0000.png": _png(mask),
    }


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


def _spec(url: str, data: bytes | None, fmt: str = "btad", name: str = "btad.zip") -> DatasetSpec:
    sha = None if data is None else hashlib.sha256(data).hexdigest()
    return DatasetSpec(fmt, url, name, sha, "test", fmt, "http://example.invalid")


SMALL = {"01": SplitCounts(2, 1, 1)}


def test_fetch_and_convert(server, tmp_path):
    archive = _zip(_btad_files())
    server.files["/btad.zip"] = archive
    result = fetch(_spec(server.base + "/btad.zip", archive), tmp_path, check_counts=False)
    assert result.dest == tmp_path / "btad" and result.counts == SMALL
    assert (tmp_path / "btad/01/ground_truth/ko/0000_mask.png").is_file()
    assert (tmp_path / "archives/btad.zip").read_bytes() == archive
    assert (
        not (tmp_path / "btad-raw").exists() and not (tmp_path / "archives/btad.zip.part").exists()
    )
    again = fetch(_spec(server.base + "/btad.zip", archive), tmp_path, check_counts=False)
    assert again.split_sha256 == result.split_sha256 and len(server.requests) == 1  # no re-download


def test_wrong_checksum_removes_partial(server, tmp_path):
    server.files["/btad.zip"] = _zip(_btad_files())
    spec = _spec(server.base + "/btad.zip", b"something else")
    with pytest.raises(DZADInputError, match="SHA-256 mismatch"):
        fetch(spec, tmp_path)
    assert list((tmp_path / "archives").iterdir()) == [] and not (tmp_path / "btad").exists()


def test_truncated_download_resumes(server, tmp_path):
    archive = _zip(_btad_files())
    server.files["/btad.zip"] = archive
    server.truncate_once.add("/btad.zip")
    spec = _spec(server.base + "/btad.zip", archive)
    with pytest.raises(DZADInputError, match=r"interrupted.*run again"):
        fetch(spec, tmp_path, check_counts=False)
    part = tmp_path / "archives/btad.zip.part"
    assert (
        part.stat().st_size == len(archive) // 2 and not (tmp_path / "archives/btad.zip").exists()
    )
    result = fetch(spec, tmp_path, check_counts=False)
    assert server.requests[-1] == ("/btad.zip", f"bytes={len(archive) // 2}-")
    assert (tmp_path / "archives/btad.zip").read_bytes() == archive and result.counts == SMALL


@pytest.mark.parametrize("ignore_range", [False, True])
def test_download_range_resume(server, tmp_path, ignore_range):
    data = bytes(range(256)) * 1000
    server.files["/blob"] = data
    server.ignore_range = ignore_range  # a server without Range support: start again
    dest = tmp_path / "blob"
    (tmp_path / "blob.part").write_bytes(data[:1000])
    download(server.base + "/blob", dest, hashlib.sha256(data).hexdigest())
    assert dest.read_bytes() == data and server.requests == [("/blob", "bytes=1000-")]


def test_complete_part_and_http_errors(server, tmp_path):
    data = b"x" * 5000
    server.files["/blob"] = data
    (tmp_path / "blob.part").write_bytes(data)  # already complete: the server answers 416
    download(server.base + "/blob", tmp_path / "blob", hashlib.sha256(data).hexdigest())
    assert (tmp_path / "blob").read_bytes() == data
    with pytest.raises(DZADInputError, match="HTTP 404"):
        download(server.base + "/nothing", tmp_path / "n", None)


def test_no_network_fails_with_manual_hint(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: connection refused
    spec = _spec(f"http://127.0.0.1:{port}/btad.zip", b"")
    with pytest.raises(DZADInputError, match="cannot download") as err:
        fetch(spec, tmp_path, timeout=2)
    assert "--archive" in str(err.value) and "dzad fetch btad" in str(err.value)


def test_archive_option_and_unknown_checksum(tmp_path):
    archive = _zip(_btad_files())
    path = tmp_path / "mine.zip"
    path.write_bytes(archive)
    offline = "http://127.0.0.1:9/never"
    result = fetch(_spec(offline, archive), tmp_path / "a", archive=path, check_counts=False)
    assert result.counts == SMALL
    with pytest.raises(DZADInputError, match="mismatch"):
        fetch(_spec(offline, b"other"), tmp_path / "b", archive=path, check_counts=False)
    assert path.read_bytes() == archive  # the user's own file is never removed
    actual = hashlib.sha256(archive).hexdigest()
    with pytest.raises(DZADInputError, match=f"no SHA-256 is recorded.*{actual}"):
        fetch(_spec(offline, None), tmp_path / "c", archive=path, check_counts=False)
    assert not (tmp_path / "c/btad").exists()
    ok = fetch(
        _spec(offline, None), tmp_path / "c", archive=path, no_verify=True, check_counts=False
    )
    assert ok.counts == SMALL
    fetch(_spec(offline, None), tmp_path / "d", archive=path, sha256=actual, check_counts=False)


def test_mvtec_layout_archive(tmp_path):
    img = _png(np.zeros((8, 8, 3), np.uint8))
    mask = _png(np.full((8, 8), 255, np.uint8))
    files = {
        "bottle/train/good/000.png": img,
        "bottle/test/good/000.png": img,
        "bottle/test/broken/000.png": img,
        "bottle/ground_truth/broken/000_mask.png": mask,
        "license.txt": b"CC BY-NC-SA 4.0",
    }
    path = tmp_path / "m.tar.xz"
    path.write_bytes(_tar(files))
    spec = _spec("http://127.0.0.1:9/never", path.read_bytes(), fmt="mvtec", name="m.tar.xz")
    result = fetch(spec, tmp_path / "d", archive=path)
    assert result.dest == tmp_path / "d/mvtec" and result.counts == {"bottle": SplitCounts(1, 1, 1)}


def _zip_links(files: dict[str, bytes], links: dict[str, str]) -> bytes:
    """A zip with Unix symlink members (mode S_IFLNK, the target as the member's data)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, target in links.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar_special(kind: bytes, name: str, target: str = "") -> bytes:
    """A tar holding ``ok.txt`` and one member of type ``kind`` (hardlink, fifo, ...)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("ok.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"1"))
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        tf.addfile(info)
    return buf.getvalue()


def _tar_long_chain() -> bytes:
    """CVE-2025-4517's shape: a symlink chain resolving past PATH_MAX, then an escape."""
    step = "d" * 247
    links = {}
    path = ""
    for letter in "abcdefghijklmnop":
        links[f"{path}{letter}"] = step  # relative link to a long folder name
        path += f"{letter}/"
    links["escape"] = path + "../" * len(path.split("/"))
    return _tar({"ok.txt": b"1"}, links)


# every case is an archive that must be refused before anything is written outside (or inside)
UNSAFE = {
    "tar-dotdot": lambda: _tar({"ok.txt": b"1", "../evil.txt": b"x"}),
    "tar-absolute": lambda: _tar({"/tmp/evil.txt": b"x"}),
    "tar-link-out": lambda: _tar({"ok.txt": b"1"}, {"link": "../../evil.txt"}),
    "tar-link-inside": lambda: _tar({"d/b.txt": b"1"}, {"d/link": "b.txt"}),
    "tar-hardlink": lambda: _tar_special(tarfile.LNKTYPE, "hard", "ok.txt"),
    "tar-fifo": lambda: _tar_special(tarfile.FIFOTYPE, "pipe"),
    "tar-long-symlink-chain": _tar_long_chain,
    "zip-dotdot": lambda: _zip({"ok.txt": b"1", "a/../../evil.txt": b"x"}),
    "zip-absolute": lambda: _zip({"/evil.txt": b"x"}),
    "zip-link-out": lambda: _zip_links({"d/b.txt": b"1"}, {"d/link": "../../evil"}),
    "zip-link-inside": lambda: _zip_links({"d/b.txt": b"1"}, {"d/link": "b.txt"}),
    # each link passes a per-link lexical check, but they chain three levels outward
    "zip-chained-symlinks": lambda: _zip_links(
        {"x/evil.txt": b"x"}, {"p/q/r/s/a": "../../../..", "x": "p/q/r/s/a/../../.."}
    ),
}


@pytest.mark.parametrize("make", UNSAFE.values(), ids=UNSAFE.keys())
def test_unsafe_archives_rejected(tmp_path, make):
    path = tmp_path / "x" / "y" / "z" / "bad.archive"
    path.parent.mkdir(parents=True)
    path.write_bytes(make())
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(DZADInputError, match=r"unsafe|outside"):
        safe_extract(path, tmp_path / "x" / "y" / "z" / "out")
    assert sorted(tmp_path.rglob("*")) == before  # nothing written anywhere, no partial folder
    assert not (tmp_path.parent / "evil.txt").exists()


def test_zip_without_unix_modes_and_junk(tmp_path):
    (tmp_path / "ok.zip").write_bytes(_zip({"d/b.txt": b"data", "d/e/": b""}))
    safe_extract(tmp_path / "ok.zip", tmp_path / "o2")
    assert (tmp_path / "o2/d/b.txt").read_bytes() == b"data"
    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DZADInputError):
        safe_extract(tmp_path / "junk.zip", tmp_path / "o3")
    assert not (tmp_path / "o3").exists()


def test_truncated_download_is_not_reused(server, tmp_path):
    """--no-verify checks nothing: a truncated archive already in place is removed when it fails to
    extract, so the next run downloads it again instead of failing the same way forever."""
    data = _zip(_btad_files())
    server.files["/btad.zip"] = data
    spec = _spec(server.base + "/btad.zip", None)
    kept = tmp_path / "d/archives/btad.zip"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(data[: len(data) // 2])
    with pytest.raises(DZADInputError, match="removed, run again"):
        fetch(spec, tmp_path / "d", no_verify=True, check_counts=False)
    assert not kept.exists() and not (tmp_path / "d/btad-raw").exists()
    result = fetch(spec, tmp_path / "d", no_verify=True, check_counts=False)
    assert kept.read_bytes() == data and result.counts == SMALL


def test_table_and_cli(tmp_path):
    assert set(DATASETS) == {"mvtec", "visa", "btad"}
    for spec in DATASETS.values():
        assert spec.url.startswith("https://") and len(spec.sha256 or "") == 64
    runner = CliRunner()
    assert runner.invoke(app, ["fetch", "--help"]).exit_code == 0
    fake = tmp_path / "btad.zip"
    fake.write_bytes(_zip(_btad_files()))
    result = runner.invoke(
        app, ["fetch", "btad", "--dest", str(tmp_path / "d"), "--archive", str(fake)]
    )
    assert result.exit_code == 2 and "SHA-256 mismatch" in result.output
    assert len(result.output.strip().splitlines()) == 1
    ok = runner.invoke(
        app,
        ["fetch", "btad", "--dest", str(tmp_path / "d"), "--archive", str(fake), "--no-verify",
         "--no-check-counts"],
    )  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert "split sha256:" in ok.output
