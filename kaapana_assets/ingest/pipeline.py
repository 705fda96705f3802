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
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
import logging
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
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES, QUARANTINE

from kaapana_assets.ingest.worker import (
    ALREADY_INDEXED,
    FAILED,
    INDEXED,
    QUARANTINED,
    FileResult,
    process_chunk,
    quarantine_copy,
)

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
                quarantine_copy(quarantine_root, fh.read(), r.sha256)  # type: ignore[arg-type]
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
        _POOL = (workers, ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")))
        atexit.register(_drop_pool)
    return _POOL[1]


def _drop_pool() -> None:
    global _POOL
    if _POOL is not None:
        _POOL[1].shutdown(wait=False, cancel_futures=True)
        _POOL = None


def _chunks(items: Sequence[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _finish_batch(targets: IngestTargets, results: list[FileResult], remove_sources: bool, report: IngestReport) -> None:
    _resolve_conflicts(targets.lake, results, targets.quarantine)
    if any(r.written or r.status == QUARANTINED for r in results):
        durable()  # copies on stable storage before any row points at them
    _commit(targets.lake, results, targets.quarantine, report)
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
