"""Segment one study with a loaded model: CT volume → nnU-Net → DICOM SEG archived and
indexed like any instance → per-label statistics in the `segmentations` table."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import polars as pl
import pyarrow as pa

from kaapana_assets.ingest import index
from kaapana_assets.ingest.archive import ArchiveConflict, archive_relpath, write_once
from kaapana_assets.ingest.pipeline import IngestTargets
from kaapana_assets.ingest.volume import assemble_volume, seg_labels
from kaapana_assets.lake.schemas import INSTANCES, SEGMENTATIONS
from kaapana_assets.segmentation.dicom_seg import encode_seg, model_seg, seg_instance_row, seg_uids
from kaapana_assets.segmentation.models import LoadedModel
from kaapana_assets.segmentation.statistics import label_statistics, overlay_png
from kaapana_assets.training import nnunet


class NothingToSegment(ValueError):
    pass


@dataclass
class SegmentationResult:
    study_uid: str
    series_uid: str
    seg_series_uid: str
    seg_sop_uid: str
    model: str
    statistics: list[dict[str, Any]]
    reused: bool  # this model version had already segmented this series
    preview_png: bytes | None = None
    versions: dict[str, int | None] = field(default_factory=dict)


def source_series(lake: Any, study_uid: str) -> dict[str, Any]:
    """The study's CT series to segment: the largest complete axial one."""
    series = lake.read("series", pl.col("study_uid") == study_uid)
    ct = series.filter(pl.col("modality") == "CT")
    candidates = ct.filter(pl.col("is_axial").fill_null(False) & pl.col("volume_issue").is_null())
    if candidates.height == 0:
        issues = [i for i in ct["volume_issue"].to_list() if i]
        if issues:
            raise NothingToSegment(f"study {study_uid} has no CT series that forms a volume: {issues[0]}")
        found = ", ".join(sorted(set(series["modality"].to_list()))) or "nothing indexed"
        raise NothingToSegment(f"study {study_uid} has no axial CT series to segment ({found})")
    return candidates.sort(["complete", "instance_count"], descending=True).row(0, named=True)


def _fsync(path: Path) -> None:
    """This file and its folder entry on stable storage (not a system-wide sync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_unindexed(root: Path, relpath: str, data: bytes) -> None:
    """Atomically replace an archived SEG that no index row points at (a run that stopped
    between archiving and indexing left it; its bytes differ, e.g. by ContentTime)."""
    staging = root / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / f"{uuid.uuid4().hex}.part"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, root / relpath)
    finally:
        tmp.unlink(missing_ok=True)


def index_seg(lake: Any, archive: Path, seg: hd.seg.Segmentation, data: bytes) -> dict[str, int | None]:
    """Archive a SEG we built (`data`: its encoded bytes) and index it as ingest would: its
    `instances` row, then the study's `series` and `studies` rows recomputed from
    `instances`. The row comes from the data set in memory (seg_instance_row), not from
    parsing the file again. The caller has checked that the SOP instance is not indexed.
    Returns the Delta versions written."""
    row = seg_instance_row(seg, str(seg.file_meta.TransferSyntaxUID))
    relpath = archive_relpath(row["study_uid"], row["series_uid"], row["sop_instance_uid"])
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        write_once(archive, relpath, data, sha256)
    except ArchiveConflict:
        _replace_unindexed(archive, relpath, data)
    _fsync(archive / relpath)  # durable before any row points at it
    now = dt.datetime.now(dt.timezone.utc)
    row.update(archive_path=relpath, sha256=sha256, size_bytes=len(data), ingested_at=now)
    writes = [lake.merge("instances", pa.Table.from_pylist([row], schema=INSTANCES.schema))]
    # As ingest's commit does: series and studies recomputed from the study's instances.
    instances = lake.read("instances", pl.col("study_uid") == row["study_uid"]).to_dicts()
    series = index.series_rows(instances, now)
    writes.append(lake.merge("series", index.series_table(series)))
    writes.append(lake.merge("studies", index.studies_table(index.study_rows(instances, series, now))))
    return {w.table: w.version for w in writes}


def segment_study(lake: Any, targets: IngestTargets, study_uid: str, model: LoadedModel) -> SegmentationResult:
    series = source_series(lake, study_uid)
    series_uid = series["series_uid"]
    seg_series_uid, seg_sop_uid = seg_uids(series_uid, model.name, model.version)
    existing = lake.read("segmentations", pl.col("seg_sop_instance_uid") == seg_sop_uid)
    if existing.height:
        return SegmentationResult(study_uid, series_uid, seg_series_uid, seg_sop_uid, model.ref,
                                  existing.drop("created_at").to_dicts(), reused=True, versions=lake.versions(("segmentations",)))
    # One read: the series' slices, and this model's SEG of it if a stopped run indexed one.
    rows = lake.read("instances", (pl.col("series_uid") == series_uid) | (pl.col("sop_instance_uid") == seg_sop_uid))
    indexed_seg = rows.filter(pl.col("sop_instance_uid") == seg_sop_uid)
    volume = assemble_volume([targets.archive / p for p in rows.filter(pl.col("series_uid") == series_uid)["archive_path"]])
    versions: dict[str, int | None] = {}
    if indexed_seg.height:
        # Indexed, but its statistics were never written: they are read from that SEG (the
        # archived one stays the one result of this model version; no second prediction).
        labels = seg_labels(targets.archive / indexed_seg["archive_path"][0], volume,
                            {name: value for value, name in model.label_names.items() if value})
    else:
        with model.predicting:
            labels = nnunet.predict(model.predictor, volume.hu, volume.spacing_zyx)
    with ThreadPoolExecutor(1) as pool:
        # Statistics and preview (numpy, mostly outside the GIL) while the SEG is built and indexed.
        summary = pool.submit(lambda: (label_statistics(volume.hu, labels, volume.spacing_zyx, model.label_names),
                                       overlay_png(volume.hu, labels)))
        if not indexed_seg.height:
            seg, _ = model_seg(volume, labels, model.label_names, model.name, model.version)
            versions = index_seg(lake, targets.archive, seg, encode_seg(seg))
        stats, preview = summary.result()
    now = dt.datetime.now(dt.timezone.utc)
    rows_out = [{**s, "seg_sop_instance_uid": seg_sop_uid, "study_uid": study_uid, "series_uid": series_uid,
                 "seg_series_uid": seg_series_uid, "model_name": model.name, "model_version": model.version,
                 "created_at": now} for s in stats]
    written = lake.merge("segmentations", pa.Table.from_pylist(rows_out, schema=SEGMENTATIONS.schema))
    return SegmentationResult(study_uid, series_uid, seg_series_uid, seg_sop_uid, model.ref, stats,
                              reused=False, preview_png=preview,
                              versions={**versions, "segmentations": written.version})
