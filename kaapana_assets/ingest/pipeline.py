"""Ingest DICOM files: validate, archive, index in Delta, quarantine what fails.

Order of a batch, so that a crash at any point loses nothing and a re-run converges:
  1. parse headers and write archive/quarantine copies (process pool; write-once files);
  2. one sync, so the copies are durable;
  3. MERGE instances and quarantine rows, then recompute series/studies of the affected
     studies and MERGE them (all idempotent, keyed on UIDs / content digests);
  4. only then delete the source files from the spool.
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa

from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest import index
from kaapana_assets.ingest.archive import durable, quarantine_relpath
from kaapana_assets.ingest.headers import Reason
from kaapana_assets.ingest.worker import (
    ALREADY_INDEXED,
    FAILED,
    INDEXED,
    QUARANTINED,
    FileResult,
    display_path,
    process_chunk,
    quarantine_copy,
)
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCE_ENCODINGS, INSTANCES, QUARANTINE

log = logging.getLogger(__name__)

POOL_THRESHOLD = 256  # below this, a pool's start-up costs more than it saves
DEFAULT_BATCH = 1000

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


def _quarantine_indexed(r: FileResult, quarantine_root: Path, reason: Reason, error: str) -> None:
    with open(r.source, "rb") as fh:
        quarantine_copy(quarantine_root, fh.read(), r.sha256 or "")
    r.status, r.row, r.reason, r.error = QUARANTINED, None, reason, error


def _resolve_conflicts(lake: Lake, results: list[FileResult], quarantine_root: Path) -> list[str]:
    """Same SOP Instance UID already indexed: identical bytes are a no-op, different bytes
    are a conflict, quarantined (never overwriting what the index points at). A series UID
    already indexed under another study is a conflict too (a series belongs to one study).
    Returns the archive paths written for files that ended in quarantine: no row will
    reference them, and they are removed once the quarantine copies are durable."""
    candidates = [r for r in results if r.status == INDEXED]
    if not candidates:
        return []
    sops = sorted({r.sop_uid for r in candidates if r.sop_uid})
    known = lake.read("instances", pl.col("sop_instance_uid").is_in(sops)).select(
        "sop_instance_uid", "sha256", "archive_path")
    indexed: dict[str, str] = dict(zip(known["sop_instance_uid"].to_list(), known["sha256"].to_list(), strict=True))
    referenced = set(known["archive_path"].to_list())
    series = sorted({r.series_uid for r in candidates if r.series_uid})
    known_series = lake.read("series", pl.col("series_uid").is_in(series)).select("series_uid", "study_uid")
    study_of: dict[str, str] = dict(zip(known_series["series_uid"].to_list(), known_series["study_uid"].to_list(), strict=True))
    orphans: list[str] = []
    for r in candidates:
        # An indexed file always has its UIDs and digest.
        assert r.sop_uid is not None and r.series_uid is not None and r.study_uid is not None and r.sha256
        previous = indexed.get(r.sop_uid)
        owner = study_of.setdefault(r.series_uid, r.study_uid)
        if previous == r.sha256:
            r.status, r.row = ALREADY_INDEXED, None
            continue
        if previous is not None:
            _quarantine_indexed(r, quarantine_root, Reason.SOP_CONFLICT,
                                f"SOP Instance {r.sop_uid} is already indexed with different content")
        elif owner != r.study_uid:
            _quarantine_indexed(r, quarantine_root, Reason.SERIES_CONFLICT,
                                f"series {r.series_uid} is indexed under study {owner}, this file names study {r.study_uid}")
        else:
            indexed[r.sop_uid] = r.sha256
            continue
        if r.archive_path and r.archive_path not in referenced:
            orphans.append(r.archive_path)
    return orphans


def _rows_that_fit(results: list[FileResult], now: dt.datetime, quarantine_root: Path) -> pa.Table | None:
    """The batch's new instance rows as one Arrow table. A row that does not fit the schema
    (validation should have caught it) is quarantined alone; the rest of the batch commits."""
    fresh = [r for r in results if r.status == INDEXED and r.row]
    if not fresh:
        return None
    try:
        return pa.Table.from_pylist([dict(r.row or {}, ingested_at=now) for r in fresh], schema=INSTANCES.schema)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        pass
    fitting = []
    for r in fresh:
        try:
            pa.Table.from_pylist([dict(r.row or {}, ingested_at=now)], schema=INSTANCES.schema)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            _quarantine_indexed(r, quarantine_root, Reason.MALFORMED, f"row does not fit the index: {exc}"[:500])
        else:
            fitting.append(dict(r.row or {}, ingested_at=now))
    return pa.Table.from_pylist(fitting, schema=INSTANCES.schema) if fitting else None


def _commit(lake: Lake, results: list[FileResult], quarantine_root: Path, report: IngestReport) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    writes = []
    new_rows = _rows_that_fit(results, now, quarantine_root)
    if new_rows is not None:
        writes.append(lake.merge("instances", new_rows))
    alternates = [dict(r.alternate, seen_at=now) for r in results if r.status == ALREADY_INDEXED and r.alternate]
    if alternates:
        writes.append(lake.merge("instance_encodings", pa.Table.from_pylist(alternates, schema=INSTANCE_ENCODINGS.schema)))
    quarantined = [
        {
            "sha256": r.sha256,
            "reason": str(r.reason),
            "error": r.error,
            "source_path": display_path(r.source),
            # Links and other non-files are recorded, never copied (nothing of theirs was read).
            "quarantine_path": None if r.reason == Reason.NOT_REGULAR_FILE
            else str(quarantine_root / quarantine_relpath(r.sha256)),
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
    # Every study the batch touched, not only those with new rows: a crash between the
    # instances MERGE and the series MERGE is healed by the re-run (unchanged rows are
    # skipped by their digest, so this commits nothing when all is in order).
    studies = sorted({r.study_uid for r in results if r.status in (INDEXED, ALREADY_INDEXED) and r.study_uid})
    if studies:
        instances = lake.read("instances", pl.col("study_uid").is_in(studies)).to_dicts()
        series = index.series_rows(instances, now)
        writes.append(lake.merge("series", index.series_table(series)))
        writes.append(lake.merge("studies", index.studies_table(index.study_rows(instances, series, now))))
    for w in writes:
        if w.inserted:
            report.inserted[w.table] = report.inserted.get(w.table, 0) + w.inserted
        if w.updated:
            report.updated[w.table] = report.updated.get(w.table, 0) + w.updated


_POOL: tuple[int, ProcessPoolExecutor] | None = None


def _pool(workers: int) -> ProcessPoolExecutor:
    """One worker pool per process, reused across ingests: start-up is paid once."""
    global _POOL
    if _POOL is None or _POOL[0] != workers:
        _drop_pool()
        # spawn, not fork: the caller may be a threaded Dagster or deltalake process.
        _POOL = (workers, ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                              initializer=_die_with_parent, initargs=(os.getpid(),)))
        atexit.register(_drop_pool)
    return _POOL[1]


def _die_with_parent(parent: int) -> None:
    """Pool workers end when the ingest process does, even when it is killed (-9): a
    watcher thread sees the worker re-parented and exits, so no orphan holds files open."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _drop_pool() -> None:
    global _POOL
    if _POOL is not None:
        _POOL[1].shutdown(wait=False, cancel_futures=True)
        _POOL = None


def _chunks(items: Sequence[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _finish_batch(targets: IngestTargets, results: list[FileResult], remove_sources: bool, report: IngestReport) -> None:
    orphans = _resolve_conflicts(targets.lake, results, targets.quarantine)
    if any(r.written or r.status == QUARANTINED for r in results):
        durable()  # copies on stable storage before any row points at them
    _commit(targets.lake, results, targets.quarantine, report)
    for relpath in orphans:  # their quarantine copies are durable and recorded
        (targets.archive / relpath).unlink(missing_ok=True)
    if remove_sources:
        for r in results:
            if r.status != FAILED:
                Path(r.source).unlink(missing_ok=True)
    for r in results:
        r.row = None  # keep the report small
    report.files.extend(results)


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
    runs share. Returns what happened to every file, and the Delta versions written.

    Files are parsed in chunks (in a process pool for large ingests) and committed in
    batches of `batch_size`; while the main process commits a batch, the workers already
    parse the next chunks."""
    paths = sorted({str(Path(s)) for s in sources})
    report = IngestReport()
    targets.archive.mkdir(parents=True, exist_ok=True)
    targets.quarantine.mkdir(parents=True, exist_ok=True)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    pool = _pool(workers) if workers > 1 and len(paths) >= POOL_THRESHOLD else None
    roots = (str(targets.archive), str(targets.quarantine))
    chunk = max(16, min(128, len(paths) // (8 * workers) or 1))
    # Sources that will be deleted are hard-linked into the archive instead of copied.
    jobs = [(c, *roots, remove_sources) for c in _chunks(paths, chunk)]

    # Even batches: each commit has a fixed cost, so 2,058 files are 2 × 1,029, not 1,000 + 1,000 + 58.
    batch_size = -(-len(paths) // max(1, -(-len(paths) // batch_size))) if paths else batch_size
    pending: list[FileResult] = []
    received = 0  # jobs whose results arrived

    def take(part: list[FileResult]) -> None:
        nonlocal pending, received
        pending.extend(part)
        received += 1
        if progress:
            progress(len(report.files) + len(pending), len(paths))
        if len(pending) >= batch_size:
            _finish_batch(targets, pending, remove_sources, report)
            pending = []

    try:
        for part in pool.map(process_chunk, jobs) if pool else map(process_chunk, jobs):
            take(part)
    except BrokenProcessPool as exc:
        # Parsing is idempotent (write-once copies): redo what did not arrive, in-process.
        log.warning("ingest worker pool failed (%s); continuing in-process", exc)
        _drop_pool()
        for job in jobs[received:]:
            take(process_chunk(job))
    if pending:
        _finish_batch(targets, pending, remove_sources, report)
    report.versions = targets.lake.versions(("instances", "series", "studies", "quarantine"))
    return report
