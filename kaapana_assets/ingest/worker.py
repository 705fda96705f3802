"""Per-file work of an ingest, run in pool workers: read, hash, parse, write the archive or
quarantine copy. Deliberately light (pydicom only, no polars/deltalake) so that workers
start fast."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from kaapana_assets.archive.layout import ArchiveConflict, archive_relpath, link_once, quarantine_relpath, write_once
from kaapana_assets.ingest.headers import InstanceHeader, Reason, Rejected, is_native_failure, parse_header


class Status(StrEnum):
    INDEXED = "indexed"
    ALREADY_INDEXED = "already_indexed"
    QUARANTINED = "quarantined"
    FAILED = "failed"  # could not even be read or copied: left in the spool for the next run


INDEXED, ALREADY_INDEXED, QUARANTINED, FAILED = Status


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
    archive_path: str | None = None  # where this file's archive copy is (relative to the root)
    alternate: dict[str, Any] | None = None  # this file is an indexed instance in another encoding


def display_path(path: str) -> str:
    """A spool path as text that any table can store: file names that are not UTF-8 keep
    their undecodable bytes as \\x escapes (os.fsdecode's surrogates do not encode)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_regular(source: str) -> tuple[bytes, tuple[int, int]]:
    """The bytes of a regular file, never following a link (the spool is writable by others:
    a link there may point anywhere). Raises NotRegular for anything else."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegular(f"a symbolic link (to {os.readlink(source)!r:.200}); links are never followed") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegular(f"not a regular file (mode {stat.filemode(info.st_mode)})")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(), (info.st_dev, info.st_ino)
    finally:
        os.close(fd)


class NotRegular(Exception):
    pass


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
        data, inode = read_regular(source)
    except NotRegular as exc:
        marker = hashlib.sha256(b"not-a-regular-file:" + os.fsencode(source)).hexdigest()
        return FileResult(source, QUARANTINED, sha256=marker, reason=Reason.NOT_REGULAR_FILE, error=str(exc))
    except OSError as exc:
        return FileResult(source, FAILED, reason=Reason.IO_ERROR, error=f"{type(exc).__name__}: {exc}")
    sha = hashlib.sha256(data).hexdigest()
    result = FileResult(source, QUARANTINED, sha256=sha, size=len(data))
    header: InstanceHeader | None = None
    try:
        header = parse_header(data)
        rel = archive_relpath(header.study_uid, header.series_uid, header.sop_instance_uid)
        if link:
            result.written = link_once(Path(archive_root), rel, source, sha, data, inode)
        else:
            result.written = write_once(Path(archive_root), rel, data, sha)
        result.archive_path = rel
    except Rejected as exc:
        result.reason, result.error = exc.reason, exc.message
        result.study_uid, result.sop_uid = exc.study_uid, exc.sop_uid
    except ArchiveConflict as exc:
        assert header is not None
        result.study_uid, result.sop_uid = header.study_uid, header.sop_instance_uid
        alternate = _alternate_encoding(Path(archive_root) / rel, data, header)
        if alternate is not None:
            result.status, result.alternate = ALREADY_INDEXED, dict(alternate, source_path=display_path(source))
            result.series_uid, result.modality = header.series_uid, header.modality
            return result
        result.reason, result.error = Reason.SOP_CONFLICT, str(exc)
    except BaseException as exc:  # defensive: a parser bug (or a codec's panic) must not lose the file
        if not is_native_failure(exc):
            raise
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


def _alternate_encoding(archived_path: Path, data: bytes, header: InstanceHeader) -> dict[str, Any] | None:
    """The record of `data` as another encoding of the archived instance, or None."""
    from kaapana_assets.archive.layout import sha256_of
    from kaapana_assets.ingest.encodings import same_instance

    try:
        archived = archived_path.read_bytes()
        if not same_instance(archived, data):  # never raises on hostile bytes
            return None
        archived_syntax = parse_header(archived).transfer_syntax_uid
    except (OSError, Rejected):
        return None
    return {
        "sop_instance_uid": header.sop_instance_uid,
        "sha256": hashlib.sha256(data).hexdigest(),
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "size_bytes": len(data),
        "archived_sha256": sha256_of(archived_path),
        "archived_transfer_syntax_uid": archived_syntax,
    }


def process_chunk(args: tuple[list[str], str, str, bool]) -> list[FileResult]:
    sources, archive_root, quarantine_root, link = args
    return [process_file(s, archive_root, quarantine_root, link) for s in sources]
