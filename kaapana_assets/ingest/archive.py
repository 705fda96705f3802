"""The DICOM archive (the PACS role): `<study>/<series>/<sop>.dcm`, written atomically and
never overwritten. Every path component is a validated UID, so no file can leave the root."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from kaapana_assets.ingest.uids import require_uid


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


def write_once(root: Path, relpath: str, data: bytes, sha256: str) -> bool:
    """Write `data` to root/relpath atomically (temp file + hard link, which fails if the
    target exists). Returns True if written, False if the same content was already there;
    raises ArchiveConflict if different content is."""
    final = root / relpath
    if not final.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{relpath!r} leaves the archive")
    if final.exists():
        if sha256_of(final) == sha256:
            return False
        raise ArchiveConflict(f"{relpath} exists with different content")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = root / ".staging"
    staging.mkdir(exist_ok=True)
    tmp = staging / f"{uuid.uuid4().hex}.part"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        try:
            os.link(tmp, final)  # atomic create-if-absent: never clobbers a concurrent writer
        except FileExistsError:
            if sha256_of(final) != sha256:
                raise ArchiveConflict(f"{relpath} exists with different content") from None
            return False
        except OSError:
            # Filesystems without hard links: rename is atomic too (exists() checked above).
            os.replace(tmp, final)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def durable() -> None:
    """Flush written files to stable storage before sources are deleted: one sync per
    batch instead of an fsync per file."""
    os.sync()
