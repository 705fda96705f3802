"""One way to write a file that readers may see at any moment: a temp file beside it,
fsync, rename over the target, fsync of the folder. A reader sees the old file or the new
one, never half of one; after a crash, nothing or the whole file; the temp file never
outlives a failed write. Spool files, federation files and metrics textfiles all use it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

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
                os.fsync(fd)
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
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)  # the rename itself on stable storage
        finally:
            os.close(handle)
    return path
