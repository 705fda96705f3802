"""Per-file work of an ingest, run in pool workers: read, hash, parse, write the archive or
quarantine copy. Deliberately light (pydicom only, no polars/deltalake) so that workers
start fast."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaapana_assets.ingest.archive import ArchiveConflict, archive_relpath, link_once, quarantine_relpath, write_once
from kaapana_assets.ingest.headers import Reason, Rejected, parse_header

INDEXED = "indexed"
ALREADY_INDEXED = "already_indexed"
QUARANTINED = "quarantined"
FAILED = "failed"  # could not even be read or copied: left in the spool for the next run


@dataclass
class FileResult:
    source: str
    status: str
    sha256: str | None = None
    size: int = 0
    reason: str | None = None
    error: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    modality: str | None = None
    row: dict[str, Any] | None = None
    written: bool = False


def quarantine_copy(quarantine_root: Path, data: bytes, sha: str) -> str:
    rel = quarantine_relpath(sha)
    try:
        write_once(quarantine_root, rel, data, sha)
    except ArchiveConflict:  # a sha256 collision would be news; keep the first
        pass
    return rel


def process_file(source: str, archive_root: str, quarantine_root: str, link: bool = False) -> FileResult:
    """Parse one file and write its archive or quarantine copy (a hard link when `link`:
    the source is a spool file that will be deleted). Runs in pool workers; never raises:
    every outcome is a FileResult."""
    try:
        with open(source, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return FileResult(source, FAILED, reason=Reason.IO_ERROR, error=f"{type(exc).__name__}: {exc}")
    sha = hashlib.sha256(data).hexdigest()
    result = FileResult(source, QUARANTINED, sha256=sha, size=len(data))
    try:
        header = parse_header(data)
        rel = archive_relpath(header.study_uid, header.series_uid, header.sop_instance_uid)
        if link:
            result.written = link_once(Path(archive_root), rel, source, sha)
        else:
            result.written = write_once(Path(archive_root), rel, data, sha)
    except Rejected as exc:
        result.reason, result.error = exc.reason, exc.message
        result.study_uid, result.sop_uid = exc.study_uid, exc.sop_uid
    except ArchiveConflict as exc:
        result.reason, result.error = Reason.SOP_CONFLICT, str(exc)
        result.study_uid, result.sop_uid = header.study_uid, header.sop_instance_uid
    except Exception as exc:  # defensive: a parser bug must not lose the file
        result.reason, result.error = Reason.MALFORMED, f"{type(exc).__name__}: {exc}"[:500]
    else:
        result.status = INDEXED
        result.study_uid, result.series_uid = header.study_uid, header.series_uid
        result.sop_uid, result.modality = header.sop_instance_uid, header.modality
        row = header.as_dict()
        row.update(archive_path=rel, sha256=sha, size_bytes=len(data))
        result.row = row
        return result
    try:
        quarantine_copy(Path(quarantine_root), data, sha)
    except OSError as exc:
        result.status, result.error = FAILED, f"{result.error}; quarantine copy failed: {exc}"
    return result


def process_chunk(args: tuple[list[str], str, str, bool]) -> list[FileResult]:
    sources, archive_root, quarantine_root, link = args
    return [process_file(s, archive_root, quarantine_root, link) for s in sources]
