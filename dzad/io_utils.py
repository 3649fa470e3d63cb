"""Atomic writes: a crash or a bad input never leaves a half-written file behind.

Temp files and folders are created with modes 0666 / 0777 minus the umask (as a plain ``open``
would), not ``mkstemp``'s 0600. Temp names carry the writer's pid, so a later write of the same
path removes what a killed writer left behind (and puts back a folder caught mid-swap).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from dzad.errors import DZADInputError


def _temp_name(path: Path, suffix: str = "") -> Path:
    """``.<name>.<pid>.<random>.tmp<suffix>`` beside ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")


def _create_temp_file(path: Path, suffix: str = "") -> tuple[int, Path]:
    """A new, exclusively created temp file beside ``path`` (mode 0666 minus the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temp_name(path, suffix)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    fd, tmp = _create_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for writers that want a filename (PIL, pandas, numpy).

    The temp file becomes ``path`` only if the block finishes without an exception. The temp name
    keeps ``path``'s suffix so format detection by extension still works.
    """
    path = Path(path)
    fd, tmp = _create_temp_file(path, path.suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: str | Path) -> None:
    """Remove what a killed writer of ``path`` left: its temp files and folders (writer no longer
    running) and ``.<name>.old``, which is first put back when ``path`` itself is missing (the
    writer died between its two renames)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        os.replace(old, path)
    _remove(old)
    ours = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp")
    for tmp in path.parent.iterdir():
        match = ours.fullmatch(tmp.name)
        if match and not _alive(int(match.group(1))):
            _remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder under a temp name, then swap it in whole (the old one stays on failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = _temp_name(path)
    tmp.mkdir(0o777)
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def lock_folder(folder: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``folder/.dzad.lock``, ``flock``) for the block.

    A second holder fails at once with :class:`DZADInputError` naming the folder; the kernel frees
    the lock when the holder exits, however it exits. A folder made here is removed again when the
    block fails before writing anything into it.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".dzad.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DZADInputError(
                folder, f"in use by another {what} (wait for it or choose another folder)"
            ) from None
        yield
    except BaseException:
        if created and [p.name for p in folder.iterdir()] == [lock.name]:
            lock.unlink()  # a failed first run leaves no empty folder behind
            folder.rmdir()
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def replace_outputs(out: str | Path, names: tuple[str, ...]) -> Iterator[Path]:
    """Yield a staging folder inside ``out`` for one run's outputs ``names`` (files or folders).

    On success each ``out/<name>`` is replaced by the staged one, or removed when this run did not
    make it, so ``out`` describes exactly one run (no stale heat maps of an earlier one). On any
    failure the staging folder is removed and ``out`` stays as it was. Hold :func:`lock_folder`.
    """
    out = Path(out)
    for name in (*names, "run"):
        clean_stale(out / name)
    stage = _temp_name(out / "run")
    stage.mkdir(0o777, parents=True)
    try:
        yield stage
        for name in names:  # scores tables last: they list the heat maps already in place
            old = out / f".{name}.old"
            if (out / name).exists():
                _remove(old)
                os.replace(out / name, old)
            if (stage / name).exists():
                os.replace(stage / name, out / name)
            if old.exists():
                _remove(old)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_writable(folder: str | Path) -> Path:
    """Prove a file can be written in ``folder`` (or, while it does not exist, in its nearest
    existing parent, which is where it will be created) before any work; creates nothing.

    Raises :class:`DZADInputError` naming the folder (read-only, no permission, full disk).
    """
    folder = Path(folder)
    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise DZADInputError(folder, f"output folder is not writable ({probe} is not a folder)")
    try:
        fd, tmp = _create_temp_file(probe / "write-check")
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            tmp.unlink()
    except OSError as exc:
        raise DZADInputError(folder, f"output folder is not writable ({exc.strerror})") from None
    return folder


def write_error(path: str | Path, exc: OSError) -> DZADInputError:
    """One-line error for a failed output write (full disk, read-only, quota)."""
    what = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
    return DZADInputError(path, f"cannot write the outputs ({what}); nothing partial was kept")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
