"""The archive service: every write path (ingest's files, segmentation's SEGs) puts DICOM into
the archive and its index in the lake through an `Archive`.

One durability rule: the files that rows name are on stable storage before those rows commit
(`store` flushes the archive's and the quarantine's filesystems once per call, not per file),
and nothing a row names is deleted. One order: a SEG's segments (`seg_segments`) commit
before its `instances` row, so an indexed SEG has its provenance recorded; the `series` and
`studies` rows of the touched studies are recomputed from `instances` (`reconcile`)."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
from pydicom.errors import InvalidDicomError

from kaapana_assets.archive import index
from kaapana_assets.archive.layout import ArchiveConflict, archive_relpath, overwrite_unindexed, write_once
from kaapana_assets.dicom.seg_segments import read_segment_rows
from kaapana_assets.files import sync_filesystem
from kaapana_assets.home import KaapanaHome
from kaapana_assets.lake import Lake, WriteResult
from kaapana_assets.lake.schemas import INSTANCE_ENCODINGS, INSTANCES, QUARANTINE, SEG_SEGMENTS, SERIES, STUDIES

log = logging.getLogger(__name__)


@dataclass
class Indexed:
    """What one `store` or `reconcile` committed: the Delta writes, and the rows it derived
    (segments read from archived SEGs; series and studies recomputed)."""

    writes: list[WriteResult] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)
    series: list[dict[str, Any]] = field(default_factory=list)
    studies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def versions(self) -> dict[str, int | None]:
        return {w.table: w.version for w in self.writes}


@dataclass(frozen=True)
class Archive:
    """A site's archive: its root folder, its quarantine folder and the lake with its index."""

    lake: Lake
    root: Path
    quarantine: Path

    @classmethod
    def for_home(cls, home: KaapanaHome, lake: Lake | None = None) -> Archive:
        """The home's archive, indexed in `lake` (default: the home's own lake folder)."""
        home.ensure()
        return cls(lake or Lake(home.lake), home.archive, home.quarantine)

    def write(self, data: bytes, row: dict[str, Any], *, replace_unindexed: bool = False) -> dict[str, Any]:
        """Put one instance, given as its bytes and its `instances` row (built from the data
        set in memory, not parsed again), at its place in the archive; returns the row with
        archive_path, sha256, size_bytes and ingested_at. Durable only once `store` indexes
        it. A different file at that place raises ArchiveConflict, unless `replace_unindexed`:
        the caller has checked that no index row names this SOP instance, so that file is
        what a run stopped before indexing left, and is replaced."""
        relpath = archive_relpath(row["study_uid"], row["series_uid"], row["sop_instance_uid"])
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            write_once(self.root, relpath, data, sha256)
        except ArchiveConflict:
            if not replace_unindexed:
                raise
            overwrite_unindexed(self.root, relpath, data)
        return {**row, "archive_path": relpath, "sha256": sha256, "size_bytes": len(data),
                "ingested_at": dt.datetime.now(dt.timezone.utc)}

    def store(self, instances: pa.Table | None = None, *, encodings: pa.Table | None = None,
              quarantined: pa.Table | None = None, written: bool = True) -> Indexed:
        """Index files already written into the archive (`instances` rows), other encodings
        of indexed instances (`instance_encodings` rows) and files in the quarantine
        (`quarantine` rows). First the files are made durable (skipped when nothing was
        `written` since they last were), then the segments of the SEGs among `instances`,
        then the rows, each table one MERGE (idempotent: keyed on UIDs and digests)."""
        if written:
            self._make_durable()
        now = dt.datetime.now(dt.timezone.utc)
        result = Indexed()
        if instances is not None and instances.num_rows:
            result.segments = archived_segment_rows(
                self.root, instances.select(["sop_instance_uid", "modality", "archive_path"]).to_pylist(), now)
            if result.segments:
                result.writes.append(self.lake.merge(SEG_SEGMENTS, index.to_table(result.segments, SEG_SEGMENTS.schema)))
            result.writes.append(self.lake.merge(INSTANCES, instances))
        for table, rows in ((INSTANCE_ENCODINGS, encodings), (QUARANTINE, quarantined)):
            if rows is not None and rows.num_rows:
                result.writes.append(self.lake.merge(table, rows))
        return result

    def reconcile(self, studies: Collection[str], *, heal_segments: bool = True) -> Indexed:
        """Recompute the `series` and `studies` rows of `studies` from their committed
        instances and MERGE them; unchanged rows are skipped by their digest, so a study in
        order commits nothing. First, unless `heal_segments` is False, SEGs of these studies
        without `seg_segments` rows get them (a crash between a store's two MERGEs, or a home
        indexed before the table existed): one read of `seg_segments` when they have SEGs."""
        if not studies:
            return Indexed()
        now = dt.datetime.now(dt.timezone.utc)
        instances = self.lake.read(INSTANCES, pl.col("study_uid").is_in(sorted(studies))).to_dicts()
        result = Indexed()
        if heal_segments:
            result.segments = missing_segment_rows(self.lake, self.root, instances, now)
        if result.segments:
            result.writes.append(self.lake.merge(SEG_SEGMENTS, index.to_table(result.segments, SEG_SEGMENTS.schema)))
        result.series = index.series_rows(instances, now)
        result.studies = index.study_rows(instances, result.series, now)
        result.writes += [self.lake.merge(SERIES, index.series_table(result.series)),
                          self.lake.merge(STUDIES, index.studies_table(result.studies))]
        return result

    def reindex_segments(self) -> int:
        """Record the segments of every indexed SEG that has none in `seg_segments`; the rows
        written. Until then such a SEG is no reference: its provenance is unknown."""
        segs = self.lake.read(INSTANCES, pl.col("modality") == "SEG").select(
            "sop_instance_uid", "modality", "archive_path")
        rows = missing_segment_rows(self.lake, self.root, segs.to_dicts(), dt.datetime.now(dt.timezone.utc))
        if rows:
            self.lake.merge(SEG_SEGMENTS, index.to_table(rows, SEG_SEGMENTS.schema))
        return len(rows)

    def _make_durable(self) -> None:
        """Everything written into the archive and the quarantine on stable storage: one flush
        per filesystem (they often share one)."""
        flushed: set[int] = set()
        for folder in (self.root, self.quarantine):
            try:
                device = os.stat(folder).st_dev
            except FileNotFoundError:  # never created: nothing was written there
                continue
            if device not in flushed:
                sync_filesystem(folder)
                flushed.add(device)


def archived_segment_rows(root: Path, instances: Iterable[dict[str, Any]], now: dt.datetime) -> list[dict[str, Any]]:
    """`seg_segments` rows of the SEG instances among `instances` (rows of `instances`), read
    from their archived files. A file that cannot be read is left for the next reconcile (its
    SEG is no reference meanwhile)."""
    rows: list[dict[str, Any]] = []
    for r in sorted(instances, key=lambda r: r["sop_instance_uid"]):
        if r.get("modality") != "SEG" or not r.get("archive_path"):
            continue
        sop = r["sop_instance_uid"]
        try:
            found = read_segment_rows(root / r["archive_path"])
        except (OSError, InvalidDicomError, ValueError) as exc:
            log.warning("SEG %s: segments not read (%s)", sop, exc)
            continue
        rows.extend({**row, "sop_instance_uid": sop, "indexed_at": now} for row in found)
    return rows


def missing_segment_rows(lake: Lake, root: Path, instances: Iterable[dict[str, Any]],
                         now: dt.datetime) -> list[dict[str, Any]]:
    """As `archived_segment_rows`, for the SEG instances that have no `seg_segments` rows yet;
    a recorded SEG costs one filtered read, not a file read."""
    segs = [r for r in instances if r.get("modality") == "SEG"]
    if not segs:
        return []
    sops = sorted(r["sop_instance_uid"] for r in segs)
    known = set(lake.read(SEG_SEGMENTS, pl.col("sop_instance_uid").is_in(sops))["sop_instance_uid"].to_list())
    return archived_segment_rows(root, [r for r in segs if r["sop_instance_uid"] not in known], now)
