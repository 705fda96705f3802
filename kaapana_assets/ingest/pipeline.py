"""Ingest DICOM files: validate, archive, index in Delta, quarantine what fails.

Order of work, so that a crash at any point loses nothing and a re-run converges:
  1. parse headers and write archive/quarantine copies (a parser thread, or a process
     pool for very large ingests; write-once files);
  2. per batch: `Archive.store` makes the copies durable, then MERGEs the instances and
     quarantine rows (idempotent, keyed on UIDs / content digests);
  3. every RECONCILE_EVERY instances and at the end: `Archive.reconcile` recomputes the
     series/studies of the affected studies from `instances` and MERGEs them;
  4. only then delete those batches' source files from the spool.
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import polars as pl
import pyarrow as pa

from kaapana_assets.archive import index
from kaapana_assets.archive.layout import quarantine_relpath
from kaapana_assets.archive.service import Archive
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
from kaapana_assets.lake.schemas import (
    INSTANCE_ENCODINGS,
    INSTANCES,
    QUARANTINE,
    SEG_SEGMENTS,
    SERIES,
    SERIES_PROJECTS,
    STUDIES,
)
from kaapana_assets.lake.tables import WriteResult
from kaapana_assets.projects.assignment import Arrived, ProjectSource, assign_ingested

log = logging.getLogger(__name__)

# A spawned parser process costs ≈0.5 s of CPU to start (interpreter, pydicom): the price of
# parsing ≈3,000 files. On two cores a pool only competes with the commits; it pays on
# larger machines and ingests.
POOL_THRESHOLD = 20_000
POOL_MIN_WORKERS = 3
DEFAULT_BATCH = 2000  # files per instances MERGE: each costs ≈50–100 ms however few its rows
RECONCILE_EVERY = 5000  # instances between series/studies MERGEs (and spool removals)

Progress = Callable[[int, int], None]
Job = tuple[list[str], str, str, bool]  # process_chunk's arguments


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


def _resolve_conflicts(lake: Lake, results: list[FileResult], quarantine_root: Path,
                       study_of: dict[str, str]) -> list[str]:
    """Same SOP Instance UID already indexed: identical bytes are a no-op, different bytes
    are a conflict, quarantined (never overwriting what the index points at). A series UID
    already indexed under another study is a conflict too (a series belongs to one study).
    `study_of` (series → study) carries what earlier batches of this ingest committed to
    `instances` but not yet to `series`.
    Returns the archive paths written for files that ended in quarantine: no row will
    reference them, and they are removed once the quarantine copies are durable."""
    candidates = [r for r in results if r.status == INDEXED]
    if not candidates:
        return []
    sops = sorted({r.sop_uid for r in candidates if r.sop_uid})
    known = lake.read(INSTANCES, pl.col("sop_instance_uid").is_in(sops)).select(
        "sop_instance_uid", "sha256", "archive_path")
    indexed: dict[str, str] = dict(zip(known["sop_instance_uid"].to_list(), known["sha256"].to_list(), strict=True))
    referenced = set(known["archive_path"].to_list())
    series = sorted({r.series_uid for r in candidates if r.series_uid})
    known_series = lake.read(SERIES, pl.col("series_uid").is_in(series)).select("series_uid", "study_uid")
    for series_uid, study_uid in zip(known_series["series_uid"].to_list(), known_series["study_uid"].to_list(),
                                     strict=True):
        study_of.setdefault(series_uid, study_uid)
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
        return index.to_table([dict(r.row or {}, ingested_at=now) for r in fresh], INSTANCES.schema)
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


def _commit(archive: Archive, results: list[FileResult], report: IngestReport) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    quarantine_root = archive.quarantine
    new_rows = _rows_that_fit(results, now, quarantine_root)
    alternates = [dict(r.alternate, seen_at=now) for r in results if r.status == ALREADY_INDEXED and r.alternate]
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
    # Copies on stable storage before any row points at them; a batch that wrote nothing
    # (all already archived) skips the flush.
    stored = archive.store(
        new_rows,
        encodings=index.to_table(alternates, INSTANCE_ENCODINGS.schema) if alternates else None,
        quarantined=index.to_table(quarantined, QUARANTINE.schema) if quarantined else None,
        written=any(r.written or r.status == QUARANTINED for r in results))
    _count(stored.writes, report)


def _reconcile(archive: Archive, results: list[FileResult], report: IngestReport) -> None:
    """Reconcile every study these files touched. Not only studies with new rows: a crash
    between the instances MERGE and this one is healed by the re-run, whose files are then
    already_indexed (unchanged rows are skipped by their digest, so this commits nothing
    when all is in order)."""
    studies = {r.study_uid for r in results if r.status in (INDEXED, ALREADY_INDEXED) and r.study_uid}
    _count(archive.reconcile(studies).writes, report)


def _count(writes: list[WriteResult], report: IngestReport) -> None:
    for w in writes:
        if w.table == SEG_SEGMENTS.name:  # the report counts index rows; segments are read back from SEGs
            continue
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


@dataclass
class _Committer:
    """Commits parsed files in two steps. Each batch: conflicts resolved, copies made
    durable, instance/quarantine rows MERGEd. Every RECONCILE_EVERY instances (and at the
    end): the series and studies rows of the touched studies recomputed and MERGEd, then
    the sources of those files removed from the spool. A crash in between leaves the
    sources in the spool; the re-run finds them already indexed and reconciles their
    studies. Two MERGEs fewer per batch: each costs ≈0.1 s however few its rows."""

    archive: Archive
    remove_sources: bool
    report: IngestReport
    projects: ProjectSource = field(default_factory=ProjectSource)
    study_of: dict[str, str] = field(default_factory=dict)  # series → study, this ingest
    unreconciled: list[FileResult] = field(default_factory=list)
    arrived: dict[tuple[str, str | None], Arrived] = field(default_factory=dict)  # (series, project) → arrival

    def batch(self, results: list[FileResult]) -> None:
        orphans = _resolve_conflicts(self.archive.lake, results, self.archive.quarantine, self.study_of)
        _commit(self.archive, results, self.report)
        for relpath in orphans:  # their quarantine copies are durable and recorded
            (self.archive.root / relpath).unlink(missing_ok=True)
        for r in results:
            if r.status in (INDEXED, ALREADY_INDEXED) and r.series_uid and r.study_uid:
                row = r.row or {}
                a = self.projects.arrived(r.source, r.series_uid, r.study_uid, row.get("calling_ae_title"),
                                          row.get("called_ae_title"))
                self.arrived.setdefault((a.series_uid, a.project), a)
            r.row = None  # keep the report small
        self.unreconciled.extend(results)
        if sum(1 for r in self.unreconciled if r.status == INDEXED) >= RECONCILE_EVERY:
            self.reconcile()

    def reconcile(self) -> None:
        results, self.unreconciled = self.unreconciled, []
        _reconcile(self.archive, results, self.report)
        # The series' projects in the same run as their series rows, before the spool files go:
        # a crash in between leaves the files, and the re-run assigns (a MERGE: idempotent).
        arrived, self.arrived = list(self.arrived.values()), {}
        assigned = assign_ingested(self.archive.lake, arrived)
        if assigned is not None:
            _count([assigned], self.report)
        if self.remove_sources:
            for r in results:
                if r.status != FAILED:
                    Path(r.source).unlink(missing_ok=True)
        self.report.files.extend(results)

    @property
    def done(self) -> int:
        return len(self.report.files) + len(self.unreconciled)


def _parsed(jobs: list[Job], executor: Executor, ahead: int) -> Iterator[list[FileResult]]:
    """process_chunk over `jobs` in order, at most `ahead` chunks parsed before the commit
    loop takes them: memory stays bounded however many files are queued."""
    window: deque[Future[list[FileResult]]] = deque()
    pending = iter(jobs)
    for job in islice(pending, ahead):
        window.append(executor.submit(process_chunk, job))
    while window:
        part = window.popleft().result()
        for job in islice(pending, 1):
            window.append(executor.submit(process_chunk, job))
        yield part


def ingest_files(
    sources: Iterable[str | Path],
    archive: Archive,
    *,
    workers: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    remove_sources: bool = True,
    progress: Progress | None = None,
    projects: ProjectSource | None = None,
) -> IngestReport:
    """Ingest files through the one code path that the asset, the CLI and the sensor's
    runs share. Returns what happened to every file, and the Delta versions written.

    Files are parsed in chunks and committed in batches of `batch_size`; while the main
    thread commits a batch, the next chunks are already being parsed. Parsing runs on one
    thread of this process (no start-up cost; the Delta commits run in Rust without the
    GIL, so both proceed at once); only ingests large enough to repay the start-up of a
    process pool (POOL_THRESHOLD files and at least 3 `workers`) parse in worker processes.

    `projects`: where each file's research project is read from (its project folder in the
    spool, or one project for all); the series of files that name none go to the default
    project unless they have one already (`projects/assignment.py`)."""
    paths = sorted({str(Path(s)) for s in sources})
    report = IngestReport()
    archive.root.mkdir(parents=True, exist_ok=True)
    archive.quarantine.mkdir(parents=True, exist_ok=True)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    use_pool = workers >= POOL_MIN_WORKERS and len(paths) >= POOL_THRESHOLD
    roots = (str(archive.root), str(archive.quarantine))
    chunk = max(16, min(128, len(paths) // (8 * workers) or 1))
    # Sources that will be deleted are hard-linked into the archive instead of copied.
    jobs: list[Job] = [(c, *roots, remove_sources) for c in _chunks(paths, chunk)]

    # Even batches: each commit has a fixed cost, so 2,058 files are 2 × 1,029, not 2,000 + 58.
    batch_size = -(-len(paths) // max(1, -(-len(paths) // batch_size))) if paths else batch_size
    pending: list[FileResult] = []
    received = 0  # jobs whose results arrived
    committer = _Committer(archive, remove_sources, report, projects or ProjectSource())

    def take(part: list[FileResult]) -> None:
        nonlocal pending, received
        pending.extend(part)
        received += 1
        if progress:
            progress(committer.done + len(pending), len(paths))
        if len(pending) >= batch_size:
            committer.batch(pending)
            pending = []

    # Enough chunks ahead to cover a commit, never more than two batches' worth.
    ahead = max(2 * (workers if use_pool else 1), min(64, -(-2 * batch_size // chunk)))
    if use_pool:
        try:
            for part in _parsed(jobs, _pool(workers), ahead):
                take(part)
        except BrokenProcessPool as exc:
            # Parsing is idempotent (write-once copies): redo what did not arrive, in-process.
            log.warning("ingest worker pool failed (%s); continuing in-process", exc)
            _drop_pool()
    if received < len(jobs):
        parser = ThreadPoolExecutor(1, thread_name_prefix="ingest-parse")
        try:
            for part in _parsed(jobs[received:], parser, ahead):
                take(part)
        finally:  # a failed commit stops the parsing too
            parser.shutdown(wait=True, cancel_futures=True)
    if pending:
        committer.batch(pending)
    committer.reconcile()
    report.versions = archive.lake.versions((INSTANCES, SERIES, STUDIES, QUARANTINE, SERIES_PROJECTS))
    return report
