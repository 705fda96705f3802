"""Durable files: the one place that puts written data on stable storage, and the one way to
write a file that readers may see at any moment.

Three flushes, for three guarantees: `flush(fd)` one open file's blocks (`data_only`: its
data, not its metadata); `sync_dir(folder)` the names in a folder (a file created or
renamed there survives a crash); `sync_filesystem(path)` everything written so far to the
filesystem holding `path` (one flush for many files: the archive's batches, the receive
journal's checkpoints).

`write_atomically`: a temp file beside the target, flush, rename over the target, flush of
the folder. A reader sees the old file or the new one, never half of one; after a crash,
nothing or the whole file; the temp file never outlives a failed write. Spool files,
federation files and metrics textfiles all use it."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path


def _libc_syncfs() -> object | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _libc_syncfs()  # Linux; elsewhere sync_filesystem falls back to os.sync()


def flush(fd: int, *, data_only: bool = False) -> None:
    """The open file's written blocks on stable storage; `data_only`: its data blocks, not
    its metadata (fdatasync where there is one; macOS has none)."""
    if data_only and hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:
        os.fsync(fd)


def sync_dir(folder: str | Path) -> None:
    """The entries of `folder` on stable storage: a file created, linked or renamed there
    survives a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path: str | Path) -> None:
    """Everything written to the filesystem holding `path` on stable storage (`syncfs(2)`;
    `os.sync()` where libc has none)."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:  # type: ignore[operator]
            code = ctypes.get_errno()
            raise OSError(code, f"syncfs({path}): {os.strerror(code)}")
    finally:
        os.close(fd)

# As tempfile.mkstemp opens its files (exclusive, owner-only, never through a link), without
# its per-call name generator and path handling, and without a mkdir per file: the receiver
# writes every instance through here (bench/receive.py).
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
_ATTEMPTS = 100  # names taken by others before we give up


def _create_temp(folder: str, name: str) -> tuple[int, str]:
    """An open, new, empty `.<name>.<random>.part` in `folder` (created when missing)."""
    made_folder = False
    for _ in range(_ATTEMPTS):
        temp = os.path.join(folder, f".{name}.{os.urandom(6).hex()}.part")
        try:
            return os.open(temp, _CREATE, 0o600), temp
        except FileExistsError:
            continue
        except FileNotFoundError:
            if made_folder:
                raise
            os.makedirs(folder, exist_ok=True)
            made_folder = True
    raise FileExistsError(errno.EEXIST, f"no unused temporary name for {name} after {_ATTEMPTS} attempts", folder)


def write_atomically(path: Path, data: bytes | memoryview, *, durable: bool = True) -> Path:
    """Write `data` as `path` atomically and durably; returns `path`. Temp files are named
    `.<name>.<random>.part` (the spool sensor and textfile collectors skip dot-files).
    `durable=False` skips both flushes, for a caller that makes the file durable some
    other way (the receive journal covers it until its next `syncfs`)."""
    folder = os.fspath(path.parent)
    fd, temp = _create_temp(folder, path.name)
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            if durable:
                flush(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        sync_dir(folder)  # the rename itself on stable storage
    return path
