"""Segment studies with a loaded model: CT volume → nnU-Net → DICOM SEG archived and
indexed like any instance → per-label statistics in the `segmentations` table."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import polars as pl
import pyarrow as pa

from kaapana_assets import nnunet
from kaapana_assets.archive.service import Archive
from kaapana_assets.ingest.volume import assemble_volume, seg_labels
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES, SEGMENTATIONS, SERIES
from kaapana_assets.projects.assignment import inherit_projects
from kaapana_assets.segmentation.dicom_seg import encode_seg, model_seg, seg_instance_row, seg_uids
from kaapana_assets.segmentation.models import LoadedModel
from kaapana_assets.segmentation.statistics import label_statistics, overlay_png


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


def source_series(lake: Lake, study_uid: str) -> dict[str, Any]:
    """The study's CT series to segment (pick_source_series's rule)."""
    return pick_source_series(lake.read(SERIES, pl.col("study_uid") == study_uid), study_uid)


def pick_source_series(series: pl.DataFrame, study_uid: str) -> dict[str, Any]:
    """The study's CT series to segment, from `series` rows already read (a burst reads them
    once for all its studies). Candidates: axial CT series that form a volume. Among them, in
    order: complete (no InstanceNumber gap) first, then the most slices, then the thinnest
    slices, then the lowest SeriesNumber, then the lowest SeriesInstanceUID: a total order,
    so the same study always gives the same series, whatever order its rows come in."""
    series = series.filter(pl.col("study_uid") == study_uid)
    ct = series.filter(pl.col("modality") == "CT")
    candidates = ct.filter(pl.col("is_axial").fill_null(False) & pl.col("volume_issue").is_null())
    if candidates.height == 0:
        issues = [i for i in ct["volume_issue"].to_list() if i]
        if issues:
            raise NothingToSegment(f"study {study_uid} has no CT series that forms a volume: {issues[0]}")
        found = ", ".join(sorted(set(series["modality"].to_list()))) or "nothing indexed"
        raise NothingToSegment(f"study {study_uid} has no axial CT series to segment ({found})")
    ranked = candidates.with_columns(
        pl.col("complete").fill_null(False).alias("_complete"), pl.col("instance_count").fill_null(0).alias("_slices"))
    return ranked.sort(
        ["_complete", "_slices", "slice_thickness", "series_number", "series_uid"],
        descending=[True, True, False, False, False], nulls_last=True,
    ).drop("_complete", "_slices").row(0, named=True)


def archive_seg(archive: Archive, seg: hd.seg.Segmentation, data: bytes) -> dict[str, Any]:
    """Archive a SEG we built (`data`: its encoded bytes) and return its `instances` row, from
    the data set in memory (seg_instance_row), not from parsing the file again. The caller
    has checked that the SOP instance is not indexed: a file at its place is a stopped run's."""
    return archive.write(data, seg_instance_row(seg, str(seg.file_meta.TransferSyntaxUID)), replace_unindexed=True)


def commit_segs(archive: Archive, instance_rows: list[dict[str, Any]],
                statistics_rows: list[dict[str, Any]]) -> dict[str, int | None]:
    """Index archived SEGs through the archive service, as ingest does — their segments,
    their `instances` rows, their studies' `series` and `studies` rows — and only then their
    statistics (a `segmentations` row never points at an unindexed SEG). Returns the Delta
    versions."""
    versions: dict[str, int | None] = {}
    if instance_rows:
        stored = archive.store(pa.Table.from_pylist(instance_rows, schema=INSTANCES.schema))
        # These SEGs' segments were stored with them; the studies' other SEGs are ingest's to heal.
        reconciled = archive.reconcile({r["study_uid"] for r in instance_rows}, heal_segments=False)
        versions.update(stored.versions, **reconciled.versions)
    if statistics_rows:
        # Each SEG series in the projects of the series it segments, with its series row.
        inherited = inherit_projects(archive.lake, {r["seg_series_uid"]: (r["study_uid"], r["series_uid"])
                                                    for r in statistics_rows})
        if inherited is not None:
            versions[inherited.table] = inherited.version
        written = archive.lake.merge(SEGMENTATIONS, pa.Table.from_pylist(statistics_rows, schema=SEGMENTATIONS.schema))
        versions[written.table] = written.version
    return versions


@dataclass
class _Segmented:
    result: SegmentationResult
    instance_row: dict[str, Any] | None  # the archived SEG's row; None: indexed already
    statistics_rows: list[dict[str, Any]]


@dataclass
class _RunIndex:
    """What a run reads of the index once for all of its studies: three Delta reads per run,
    not three per study."""

    sources: dict[str, dict[str, Any] | NothingToSegment]  # study -> its source series row, or why none
    statistics: pl.DataFrame  # `segmentations` rows of the SEGs this model would make of those series
    instances: pl.DataFrame | None  # the source series' slices, and those SEGs if indexed; None: all reused
    statistics_versions: dict[str, int | None]

    @classmethod
    def read(cls, lake: Lake, study_uids: list[str], model: LoadedModel) -> _RunIndex:
        series = lake.read(SERIES, pl.col("study_uid").is_in(study_uids))
        sources: dict[str, dict[str, Any] | NothingToSegment] = {}
        for study_uid in study_uids:
            try:
                sources[study_uid] = pick_source_series(series, study_uid)
            except NothingToSegment as exc:
                sources[study_uid] = exc
        seg_sops = {row["series_uid"]: seg_uids(row["series_uid"], model.name, model.version)[1]
                    for row in sources.values() if isinstance(row, dict)}
        statistics = lake.read(SEGMENTATIONS, pl.col("seg_sop_instance_uid").is_in(list(seg_sops.values())))
        # Only series whose SEG has no statistics yet are read slice by slice.
        made = set(statistics["seg_sop_instance_uid"].to_list())
        to_segment = {series_uid: sop for series_uid, sop in seg_sops.items() if sop not in made}
        instances = lake.read(INSTANCES, pl.col("series_uid").is_in(list(to_segment))
                              | pl.col("sop_instance_uid").is_in(list(to_segment.values()))) if to_segment else None
        versions = lake.versions((SEGMENTATIONS,)) if statistics.height else {}
        return cls(sources, statistics, instances, versions)


def _segment(archive: Archive, study_uid: str, model: LoadedModel, run_index: _RunIndex) -> _Segmented:
    series = run_index.sources[study_uid]
    if isinstance(series, NothingToSegment):
        raise series
    series_uid = series["series_uid"]
    seg_series_uid, seg_sop_uid = seg_uids(series_uid, model.name, model.version)
    existing = run_index.statistics.filter(pl.col("seg_sop_instance_uid") == seg_sop_uid)
    if existing.height:
        return _Segmented(SegmentationResult(study_uid, series_uid, seg_series_uid, seg_sop_uid, model.ref,
                                             existing.drop("created_at").to_dicts(), reused=True,
                                             versions=run_index.statistics_versions), None, [])
    # The series' slices, and this model's SEG of it if a stopped run indexed one.
    assert run_index.instances is not None  # read for every series whose SEG has no statistics
    rows = run_index.instances.filter((pl.col("series_uid") == series_uid) | (pl.col("sop_instance_uid") == seg_sop_uid))
    indexed_seg = rows.filter(pl.col("sop_instance_uid") == seg_sop_uid)
    volume = assemble_volume([archive.root / p for p in rows.filter(pl.col("series_uid") == series_uid)["archive_path"]])
    instance_row = None
    if indexed_seg.height:
        # Indexed, but its statistics were never written: they are read from that SEG (the
        # archived one stays the one result of this model version; no second prediction).
        labels = seg_labels(archive.root / indexed_seg["archive_path"][0], volume,
                            {name: value for value, name in model.label_names.items() if value})
    else:
        with model.predicting:
            labels = nnunet.predict(model.predictor, volume.hu, volume.spacing_zyx)
    with ThreadPoolExecutor(1) as pool:
        # Statistics and preview (numpy, mostly outside the GIL) while the SEG is built and archived.
        summary = pool.submit(lambda: (label_statistics(volume.hu, labels, volume.spacing_zyx, model.label_names),
                                       overlay_png(volume.hu, labels)))
        if not indexed_seg.height:
            seg, _ = model_seg(volume, labels, model.label_names, model.name, model.version)
            instance_row = archive_seg(archive, seg, encode_seg(seg))
        stats, preview = summary.result()
    now = dt.datetime.now(dt.timezone.utc)
    statistics_rows = [{**s, "seg_sop_instance_uid": seg_sop_uid, "study_uid": study_uid, "series_uid": series_uid,
                        "seg_series_uid": seg_series_uid, "model_name": model.name, "model_version": model.version,
                        "created_at": now} for s in stats]
    return _Segmented(SegmentationResult(study_uid, series_uid, seg_series_uid, seg_sop_uid, model.ref, stats,
                                         reused=False, preview_png=preview), instance_row, statistics_rows)


def segment_studies(archive: Archive, study_uids: list[str], model: LoadedModel,
                    progress: Callable[[int, int, SegmentationResult], None] | None = None,
                    ) -> tuple[list[SegmentationResult], dict[str, str]]:
    """Segment studies with one loaded model (a run's burst). Each SEG is archived as soon as
    it is built; the index and the statistics of all of them are committed together at the
    end — five Delta commits per run, not per study — and, should a study raise, what was
    archived before it is committed before the error goes on. A study with nothing to
    segment is skipped: (results, {study: reason}). `progress(done, total, result)` hears of each study as it is done."""
    done: list[_Segmented] = []
    skipped: dict[str, str] = {}
    try:
        run_index = _RunIndex.read(archive.lake, study_uids, model)
        for study_uid in study_uids:
            try:
                done.append(_segment(archive, study_uid, model, run_index))
                if progress:
                    progress(len(done) + len(skipped), len(study_uids), done[-1].result)
            except NothingToSegment as exc:
                skipped[study_uid] = str(exc)
    finally:
        versions = commit_segs(archive, [d.instance_row for d in done if d.instance_row is not None],
                               [row for d in done for row in d.statistics_rows])
    for d in done:
        if not d.result.reused:
            d.result.versions = versions
    return [d.result for d in done], skipped


def segment_study(archive: Archive, study_uid: str, model: LoadedModel) -> SegmentationResult:
    """One study (NothingToSegment if it has no CT volume to segment)."""
    results, skipped = segment_studies(archive, [study_uid], model)
    if skipped:
        raise NothingToSegment(skipped[study_uid])
    return results[0]
