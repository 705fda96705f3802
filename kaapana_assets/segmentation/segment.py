"""Segment one study with a loaded model: CT volume → nnU-Net → DICOM SEG archived and
indexed like any instance → per-label statistics in the `segmentations` table."""

from __future__ import annotations

import datetime as dt
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from kaapana_assets.ingest.pipeline import IngestTargets, ingest_files
from kaapana_assets.ingest.volume import assemble_volume
from kaapana_assets.lake.schemas import SEGMENTATIONS
from kaapana_assets.segmentation.dicom_seg import seg_uids, write_seg
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


def segment_study(lake: Any, targets: IngestTargets, study_uid: str, model: LoadedModel) -> SegmentationResult:
    series = source_series(lake, study_uid)
    seg_series_uid, seg_sop_uid = seg_uids(series["series_uid"], model.name, model.version)
    existing = lake.read("segmentations", pl.col("seg_sop_instance_uid") == seg_sop_uid)
    if existing.height:
        return SegmentationResult(study_uid, series["series_uid"], seg_series_uid, seg_sop_uid, model.ref,
                                  existing.drop("created_at").to_dicts(), reused=True, versions=lake.versions(("segmentations",)))
    paths = lake.read("instances", pl.col("series_uid") == series["series_uid"])["archive_path"].to_list()
    volume = assemble_volume([targets.archive / p for p in paths])
    labels = nnunet.predict(model.predictor, volume.hu, volume.spacing_zyx)
    with tempfile.TemporaryDirectory() as tmp:
        seg_path, _ = write_seg(volume, labels, model.label_names, model.name, model.version, Path(tmp) / "seg.dcm")
        report = ingest_files([seg_path], targets, workers=1)  # archived and indexed like any instance
    if report.count("indexed") + report.count("already_indexed") != 1:
        failure = report.files[0]
        raise RuntimeError(f"the SEG written for {study_uid} did not index: {failure.reason}: {failure.error}")
    stats = label_statistics(volume.hu, labels, volume.spacing_zyx, model.label_names)
    now = dt.datetime.now(dt.timezone.utc)
    rows = [{**s, "seg_sop_instance_uid": seg_sop_uid, "study_uid": study_uid, "series_uid": series["series_uid"],
             "seg_series_uid": seg_series_uid, "model_name": model.name, "model_version": model.version,
             "created_at": now} for s in stats]
    lake.merge("segmentations", pa.Table.from_pylist(rows, schema=SEGMENTATIONS.schema))
    return SegmentationResult(study_uid, series["series_uid"], seg_series_uid, seg_sop_uid, model.ref, stats,
                              reused=False, preview_png=overlay_png(volume.hu, labels),
                              versions={**report.versions, **lake.versions(("segmentations",))})
