"""The archive's layout on disk: `<study>/<series>/<sop>.dcm` in the archive, `<sha[:2]>/<sha>.dcm`
in the quarantine, written atomically and never overwritten. Every path component is a
validated UID or digest, so no file can leave its root. Durability is the caller's: these
write, `Archive.store` flushes before any row names them."""

from __future__ import annotations

import hashlib
import os
import stat
import uuid
from pathlib import Path

from kaapana_assets.dicom.uids import require_uid


class ArchiveConflict(Exception):
    """A different file already sits where this one would go."""


def archive_relpath(study_uid: str, series_uid: str, sop_uid: str) -> str:
    return "/".join(
        (
            require_uid(study_uid, "StudyInstanceUID"),
            require_uid(series_uid, "SeriesInstanceUID"),
            require_uid(sop_uid, "SOPInstanceUID") + ".dcm",
        )
    )


def quarantine_relpath(sha256: str) -> str:
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return f"{sha256[:2]}/{sha256}.dcm"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_made_dirs: set[str] = set()  # per process: one mkdir per series folder, not per file


def _ensure_dir(path: str) -> None:
    if path not in _made_dirs:
        os.makedirs(path, exist_ok=True)
        _made_dirs.add(path)


def write_once(root: Path, relpath: str, data: bytes, sha256: str) -> bool:
    """Write `data` to root/relpath atomically (temp file + hard link, which fails if the
    target exists). Returns True if written, False if the same content was already there;
    raises ArchiveConflict if different content is. `relpath` must come from
    archive_relpath/quarantine_relpath, whose validated components cannot leave root."""
    if relpath.startswith("/") or ".." in relpath.split("/"):
        raise ValueError(f"{relpath!r} leaves the archive")
    final = os.path.join(root, relpath)
    if os.path.exists(final):
        if sha256_of(Path(final)) == sha256:
            return False
        raise ArchiveConflict(f"{relpath} exists with different content")
    staging = os.path.join(root, ".staging")
    tmp = os.path.join(staging, f"{uuid.uuid4().hex}.part")
    for folder in (os.path.dirname(final), staging):
        _ensure_dir(folder)
    try:
        try:
            fh = open(tmp, "wb")
        except FileNotFoundError:  # the folder was removed since it was cached
            _made_dirs.clear()
            _ensure_dir(staging)
            _ensure_dir(os.path.dirname(final))
            fh = open(tmp, "wb")
        with fh:
            fh.write(data)
        try:
            os.link(tmp, final)  # atomic create-if-absent: never clobbers a concurrent writer
        except FileExistsError:
            if sha256_of(Path(final)) != sha256:
                raise ArchiveConflict(f"{relpath} exists with different content") from None
            return False
        except OSError:
            # Filesystems without hard links: rename is atomic too (exists() checked above).
            os.replace(tmp, final)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def link_once(root: Path, relpath: str, source: str, sha256: str, data: bytes, inode: tuple[int, int]) -> bool:
    """Like write_once, but hard-links `source` (a spool file about to be deleted, whose
    bytes `data` were read from a regular file) into the archive: atomic, never clobbers,
    no data copy. The link is made to the spool entry itself (never following a symbolic
    link) and kept only if it is the regular file that was read (`inode`: its st_dev and
    st_ino); otherwise, or across
    filesystems, `data` is written as a copy."""
    if relpath.startswith("/") or ".." in relpath.split("/"):
        raise ValueError(f"{relpath!r} leaves the archive")
    final = os.path.join(root, relpath)
    _ensure_dir(os.path.dirname(final))
    try:
        os.link(source, final, follow_symlinks=False)
    except FileExistsError:
        if sha256_of(Path(final)) != sha256:
            raise ArchiveConflict(f"{relpath} exists with different content") from None
        return False
    except FileNotFoundError:
        if not os.path.exists(source):
            raise
        _made_dirs.discard(os.path.dirname(final))
    except OSError:  # EXDEV, or no hard links on this filesystem
        pass
    else:
        # The spool entry may have been swapped since it was read: keep the link only if
        # it is a regular file with the content that was parsed.
        linked = os.lstat(final)
        if stat.S_ISREG(linked.st_mode) and (linked.st_dev, linked.st_ino) == inode:
            return True
        os.unlink(final)
    return write_once(root, relpath, data, sha256)



def overwrite_unindexed(root: Path, relpath: str, data: bytes) -> None:
    """Atomically replace the file at root/relpath, which no index row names (a run that
    stopped between archiving and indexing left it), with `data`."""
    staging = root / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / f"{uuid.uuid4().hex}.part"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, root / relpath)
    finally:
        tmp.unlink(missing_ok=True)
