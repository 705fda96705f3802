"""Ingest DICOM files: validate, archive, index in Delta, quarantine what fails.

Order of a batch, so that a crash at any point loses nothing and a re-run converges:
  1. parse headers and write archive/quarantine copies (process pool; write-once files);
  2. one sync, so the copies are durable;
  3. MERGE instances and quarantine rows, then recompute series/studies of the affected
     studies and MERGE them (all idempotent, keyed on UIDs / content digests);
  4. only then delete the source files from the spool.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
import logging
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest import index
from kaapana_assets.ingest.archive import (
    ArchiveConflict,
    archive_relpath,
    durable,
    quarantine_relpath,
    write_once,
)
from kaapana_assets.ingest.headers import Reason, Rejected, parse_header
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES, QUARANTINE

INDEXED = "indexed"
ALREADY_INDEXED = "already_indexed"
QUARANTINED = "quarantined"
FAILED = "failed"  # could not even be read or copied: left in the spool for the next run

log = logging.getLogger(__name__)

POOL_THRESHOLD = 256  # below this, a pool's start-up costs more than it saves
DEFAULT_BATCH = 2000

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class IngestTargets:
    lake: Lake
    archive: Path
    quarantine: Path

    @classmethod
    def for_home(cls, home: KaapanaHome) -> "IngestTargets":
        home.ensure()
        return cls(Lake(home.lake), home.archive, home.quarantine)


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


@dataclass
class IngestReport:
    files: list[FileResult] = field(default_factory=list)
    versions: dict[str, int | None] = field(default_factory=dict)
    inserted: dict[str, int] = field(default_factory=dict)
    updated: dict[str, int] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(1 for f in self.files if f.status == status)

    @property
    def studies(self) -> list[str]:
        return sorted({f.study_uid for f in self.files if f.study_uid and f.status in (INDEXED, ALREADY_INDEXED)})

    @property
    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.files:
            if f.status == QUARANTINED and f.reason:
                out[f.reason] = out.get(f.reason, 0) + 1
        return out

    def summary(self) -> dict[str, int]:
        return {s: self.count(s) for s in (INDEXED, ALREADY_INDEXED, QUARANTINED, FAILED)}


def _quarantine_copy(quarantine_root: Path, data: bytes, sha: str) -> str:
    rel = quarantine_relpath(sha)
    try:
        write_once(quarantine_root, rel, data, sha)
    except ArchiveConflict:  # a sha256 collision would be news; keep the first
        pass
    return rel


def process_file(source: str, archive_root: str, quarantine_root: str) -> FileResult:
    """Parse one file and write its archive or quarantine copy. Runs in pool workers;
    never raises: every outcome is a FileResult."""
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
        _quarantine_copy(Path(quarantine_root), data, sha)
    except OSError as exc:
        result.status, result.error = FAILED, f"{result.error}; quarantine copy failed: {exc}"
    return result


def _process_chunk(args: tuple[list[str], str, str]) -> list[FileResult]:
    sources, archive_root, quarantine_root = args
    return [process_file(s, archive_root, quarantine_root) for s in sources]


def _resolve_conflicts(lake: Lake, results: list[FileResult], quarantine_root: Path) -> None:
    """Same SOP Instance UID already indexed: identical bytes are a no-op, different bytes
    are a conflict, quarantined (never overwriting what the index points at)."""
    candidates = [r for r in results if r.status == INDEXED]
    if not candidates:
        return
    sops = sorted({r.sop_uid for r in candidates if r.sop_uid})
    known = lake.read("instances", pl.col("sop_instance_uid").is_in(sops)).select("sop_instance_uid", "sha256")
    indexed: dict[str, str] = dict(zip(known["sop_instance_uid"].to_list(), known["sha256"].to_list()))
    for r in candidates:
        previous = indexed.get(r.sop_uid)  # type: ignore[arg-type]
        if previous is None:
            indexed[r.sop_uid] = r.sha256  # type: ignore[index]
        elif previous == r.sha256:
            r.status, r.row = ALREADY_INDEXED, None
        else:
            with open(r.source, "rb") as fh:
                _quarantine_copy(quarantine_root, fh.read(), r.sha256)  # type: ignore[arg-type]
            r.status, r.row = QUARANTINED, None
            r.reason = Reason.SOP_CONFLICT
            r.error = f"SOP Instance {r.sop_uid} is already indexed with different content"


def _commit(lake: Lake, results: list[FileResult], quarantine_root: Path, report: IngestReport) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    new_rows = [dict(r.row, ingested_at=now) for r in results if r.status == INDEXED and r.row]
    writes = []
    if new_rows:
        writes.append(lake.merge("instances", pa.Table.from_pylist(new_rows, schema=INSTANCES.schema)))
    quarantined = [
        {
            "sha256": r.sha256,
            "reason": r.reason,
            "error": r.error,
            "source_path": r.source,
            "quarantine_path": str(quarantine_root / quarantine_relpath(r.sha256)),  # type: ignore[arg-type]
            "size_bytes": r.size,
            "study_uid": r.study_uid,
            "sop_instance_uid": r.sop_uid,
            "quarantined_at": now,
        }
        for r in results
        if r.status == QUARANTINED and r.sha256
    ]
    if quarantined:
        writes.append(lake.merge("quarantine", pa.Table.from_pylist(quarantined, schema=QUARANTINE.schema)))
    studies = sorted({r.study_uid for r in results if r.status == INDEXED and r.study_uid})
    if studies:
        instances = lake.read("instances", pl.col("study_uid").is_in(studies)).to_dicts()
        series = index.series_rows(instances, now)
        writes.append(lake.merge("series", index.series_table(series)))
        writes.append(lake.merge("studies", index.studies_table(index.study_rows(instances, series, now))))
    for w in writes:
        report.inserted[w.table] = report.inserted.get(w.table, 0) + w.inserted
        report.updated[w.table] = report.updated.get(w.table, 0) + w.updated


def _chunks(items: Sequence[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def ingest_files(
    sources: Iterable[str | Path],
    targets: IngestTargets,
    *,
    workers: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    remove_sources: bool = True,
    progress: Progress | None = None,
) -> IngestReport:
    """Ingest files through the one code path that the asset, the CLI and the sensor's
    runs share. Returns what happened to every file, and the Delta versions written."""
    paths = sorted({str(Path(s)) for s in sources})
    report = IngestReport()
    targets.archive.mkdir(parents=True, exist_ok=True)
    targets.quarantine.mkdir(parents=True, exist_ok=True)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    pool: Executor | None = None
    if workers > 1 and len(paths) >= POOL_THRESHOLD:
        # spawn, not fork: the caller may be a threaded Dagster process.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    roots = (str(targets.archive), str(targets.quarantine))
    done = 0
    try:
        for batch in _chunks(paths, batch_size):
            chunk = max(16, len(batch) // (4 * workers))
            jobs = [(c, *roots) for c in _chunks(batch, chunk)]
            results: list[FileResult] = []
            try:
                mapped = pool.map(_process_chunk, jobs) if pool else map(_process_chunk, jobs)
                for part in mapped:
                    results.extend(part)
                    done += len(part)
                    if progress:
                        progress(done, len(paths))
            except BrokenProcessPool as exc:
                # Parsing is idempotent (write-once copies), so redo the batch in-process.
                log.warning("ingest worker pool failed (%s); continuing in-process", exc)
                pool.shutdown(cancel_futures=True)  # type: ignore[union-attr]
                pool = None
                done -= len(results)
                results = []
                for part in map(_process_chunk, jobs):
                    results.extend(part)
                    done += len(part)
                    if progress:
                        progress(done, len(paths))
            _resolve_conflicts(targets.lake, results, targets.quarantine)
            if any(r.written or r.status == QUARANTINED for r in results):
                durable()
            _commit(targets.lake, results, targets.quarantine, report)
            if remove_sources:
                for r in results:
                    if r.status != FAILED:
                        Path(r.source).unlink(missing_ok=True)
            for r in results:
                r.row = None  # keep the report small
            report.files.extend(results)
    finally:
        if pool:
            pool.shutdown()
    report.versions = targets.lake.versions(("instances", "series", "studies", "quarantine"))
    return report
