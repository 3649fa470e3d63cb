"""dzad.io_utils: a write either lands whole or leaves what was there (tests/test_faults.py checks
the commands on a full disk, a killed save and the lock; this file checks each helper)."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from dzad import io_utils
from dzad.errors import DZADInputError


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "new" / "a.txt"  # the folder is made
    assert io_utils.atomic_write_text(path, "é\n") == path
    assert path.read_bytes() == "é\n".encode()
    io_utils.atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second" and _names(path.parent) == ["a.txt"]


def test_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_utils.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        io_utils.atomic_write_text(path, "new")
    assert path.read_text() == "old" and _names(tmp_path) == ["a.txt"]


def test_atomic_path_keeps_the_suffix_and_lands_only_on_success(tmp_path):
    path = tmp_path / "map.png"
    with io_utils.atomic_path(path) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp != path
        tmp.write_bytes(b"png")
        assert not path.exists()  # nothing visible before the block ends
    assert path.read_bytes() == b"png"
    with pytest.raises(RuntimeError), io_utils.atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert path.read_bytes() == b"png" and _names(tmp_path) == ["map.png"]


def test_atomic_dir_swaps_the_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "ckpt"
    with io_utils.atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("1")
    with io_utils.atomic_dir(out) as tmp:
        (tmp / "a").write_text("2")
    assert _names(out) == ["a"] and (out / "a").read_text() == "2"  # no stale b
    assert _names(tmp_path) == ["ckpt"]  # the swapped-out folder is gone too
    with pytest.raises(RuntimeError), io_utils.atomic_dir(out) as tmp:
        (tmp / "a").write_text("3")
        raise RuntimeError("save failed")
    assert (out / "a").read_text() == "2" and _names(tmp_path) == ["ckpt"]


def test_clean_stale_keeps_a_live_writers_temp(tmp_path):
    path = tmp_path / "out"
    live = tmp_path / f".out.{os.getpid()}.0123abcd.tmp"
    live.write_text("being written")
    other = tmp_path / ".other.1.0123abcd.tmp"  # another path's temp: not ours to remove
    other.write_text("x")
    io_utils.clean_stale(path)
    assert live.exists() and other.exists()


def test_lock_folder_is_exclusive_released_and_tidy(tmp_path):
    folder = tmp_path / "out"
    with io_utils.lock_folder(folder, "score run"):
        with (
            pytest.raises(DZADInputError, match="in use by another score run") as info,
            io_utils.lock_folder(folder, "score run"),
        ):
            pass
        assert str(folder) in str(info.value)
    with io_utils.lock_folder(folder, "score run"):  # released on exit
        (folder / "scores.csv").write_text("x")
    with pytest.raises(RuntimeError), io_utils.lock_folder(tmp_path / "fresh", "score run"):
        raise RuntimeError("failed before writing")
    assert not (tmp_path / "fresh").exists()  # a failed first run leaves no empty folder
    with pytest.raises(RuntimeError), io_utils.lock_folder(folder, "score run"):
        raise RuntimeError("failed")
    assert (folder / "scores.csv").exists()  # an existing folder is kept


def test_replace_outputs_describes_exactly_one_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.csv").write_text("run 1")
    (out / "heatmaps").mkdir()
    (out / "heatmaps" / "a.png").write_text("run 1")
    (out / "notes.txt").write_text("not ours")
    with io_utils.replace_outputs(out, ("scores.csv", "heatmaps")) as stage:
        (stage / "scores.csv").write_text("run 2")  # this run made no heat maps
    assert (out / "scores.csv").read_text() == "run 2"
    assert _names(out) == ["notes.txt", "scores.csv"]
    with pytest.raises(RuntimeError), io_utils.replace_outputs(out, ("scores.csv",)) as stage:
        (stage / "scores.csv").write_text("run 3")
        raise RuntimeError("scoring failed")
    assert (out / "scores.csv").read_text() == "run 2"
    assert _names(out) == ["notes.txt", "scores.csv"]


def test_check_writable_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DZADInputError, match="not writable") as info:
        io_utils.check_writable(tmp_path / "f" / "out")
    assert str(tmp_path / "f" / "out") in str(info.value)
    assert io_utils.check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert _names(tmp_path) == ["f"]


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.ENOSPC, "disk full"), (errno.EDQUOT, "disk full"), (errno.EROFS, "Read-only")],
)
def test_write_error_is_one_line_naming_the_path(tmp_path, code, words):
    exc = io_utils.write_error(tmp_path / "o", OSError(code, os.strerror(code)))
    assert isinstance(exc, DZADInputError)
    text = str(exc)
    assert str(tmp_path / "o") in text and words in text and "\n" not in text


def test_sha256_file_reads_every_chunk(tmp_path):
    data = bytes(range(256)) * 5 + b"tail"
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert io_utils.sha256_file(path, chunk=7) == hashlib.sha256(data).hexdigest()
    assert io_utils.sha256_file(path) == hashlib.sha256(data).hexdigest()
