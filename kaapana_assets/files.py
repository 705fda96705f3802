"""One way to write a file that readers may see at any moment: a temp file beside it,
fsync, rename over the target, fsync of the folder. A reader sees the old file or the new
one, never half of one; after a crash, nothing or the whole file; the temp file never
outlives a failed write. Spool files, federation files and metrics textfiles all use it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes | memoryview, *, durable: bool = True) -> Path:
    """Write `data` as `path` atomically and durably; returns `path`. Temp files are named
    `.<name>.<random>.part` (the spool sensor and textfile collectors skip dot-files).
    `durable=False` skips both flushes, for a caller that makes the file durable some
    other way (the receive journal covers it until its next `syncfs`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself on stable storage
        finally:
            os.close(folder)
    return path
