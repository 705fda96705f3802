"""Cohort membership: select series with a definition, snapshot them as a numbered
version, and read any version back exactly (the series rows as they were, by Delta
time travel to the table versions the snapshot recorded)."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from kaapana_assets.cohorts.definitions import CohortDefinition
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import COHORT_MEMBERS


class EmptyCohort(ValueError):
    pass


class UnknownCohortVersion(KeyError):
    pass


@dataclass
class CohortSnapshot:
    cohort: str
    version: int
    membership_hash: str
    purpose: str
    members: pl.DataFrame  # cohort_members rows joined with the series rows as of the snapshot
    series_table_version: int | None
    tags_table_version: int | None
    created: bool = False  # True when this materialization made a new version
    cohort_members_version: int | None = None

    @property
    def size(self) -> int:
        return self.members.height


def model_outputs(lake: Lake) -> set[str]:
    """SEG series this platform's models wrote (the `segmentations` table): never references."""
    if not lake.exists("segmentations"):
        return set()
    return set(lake.read("segmentations")["seg_series_uid"].unique().to_list())


def without_model_segs(series: pl.DataFrame, outputs: set[str]) -> pl.DataFrame:
    """The series rows with only human reference SEGs listed: a study the automation segmented
    is not thereby annotated, and a model must never train on its own predictions."""
    if not outputs:
        return series
    return series.with_columns(
        pl.col("reference_seg_series_uids").list.set_difference(pl.lit(sorted(outputs), dtype=pl.List(pl.String)))
        .list.sort()
    )


def select_series(series: pl.DataFrame, tags: pl.DataFrame, definition: CohortDefinition) -> pl.DataFrame:
    """Image series (not SEG) matching the definition's filter."""
    f = definition.filter
    frame = series.filter(pl.col("modality") != "SEG")
    if f.modality:
        frame = frame.filter(pl.col("modality").is_in(f.modality))
    if f.body_part:
        frame = frame.filter(pl.col("body_part").str.to_uppercase().is_in([b.upper() for b in f.body_part]))
    if f.manufacturer:
        frame = frame.filter(pl.col("manufacturer").is_in(f.manufacturer))
    if f.institution:
        frame = frame.filter(pl.col("institution").is_in(f.institution))
    if f.slice_thickness:
        if f.slice_thickness.min is not None:
            frame = frame.filter(pl.col("slice_thickness") >= f.slice_thickness.min)
        if f.slice_thickness.max is not None:
            frame = frame.filter(pl.col("slice_thickness") <= f.slice_thickness.max)
    if f.series_description:
        frame = frame.filter(pl.col("series_description").fill_null("").str.contains(f.series_description))
    if f.study_date:
        # DICOM DA is YYYYMMDD: string order is date order.
        if f.study_date.start:
            frame = frame.filter(pl.col("study_date") >= f.study_date.start.strftime("%Y%m%d"))
        if f.study_date.end:
            frame = frame.filter(pl.col("study_date") <= f.study_date.end.strftime("%Y%m%d"))
    if f.tags:
        tagged = tags.filter(pl.col("tag").is_in(f.tags)).group_by("series_uid").agg(pl.col("tag").n_unique().alias("n"))
        have_all = tagged.filter(pl.col("n") == len(set(f.tags)))["series_uid"]
        frame = frame.filter(pl.col("series_uid").is_in(have_all.implode()))
    if f.has_reference_segmentation is not None:
        has = pl.col("reference_seg_series_uids").list.len() > 0
        frame = frame.filter(has if f.has_reference_segmentation else ~has)
    if f.include_series:
        extra = series.filter(pl.col("series_uid").is_in(f.include_series) & (pl.col("modality") != "SEG"))
        frame = pl.concat([frame, extra]).unique("series_uid", keep="first")
    if f.exclude_series:
        frame = frame.filter(~pl.col("series_uid").is_in(f.exclude_series))
    return frame.sort("series_uid")


def _reference_labels(series: pl.DataFrame, members: pl.DataFrame) -> dict[str, list[str]]:
    """Union of the segment labels of each member's reference SEG series."""
    seg_labels = dict(
        zip(*series.filter(pl.col("modality") == "SEG").select("series_uid", "segment_labels").to_dict(as_series=False).values(), strict=True)
    )
    out = {}
    for uid, segs in zip(members["series_uid"].to_list(), members["reference_seg_series_uids"].to_list(), strict=True):
        out[uid] = sorted({lab for seg in segs or [] for lab in seg_labels.get(seg) or []})
    return out


def membership_hash(members: pl.DataFrame) -> str:
    """Hash of who is in and of what their rows say: unchanged data, unchanged hash."""
    h = hashlib.sha256()
    for uid, digest in sorted(zip(members["series_uid"].to_list(), members["row_digest"].to_list(), strict=True)):
        h.update(f"{uid}:{digest}\n".encode())
    return h.hexdigest()[:24]


def latest_version(lake: Lake, cohort: str) -> tuple[int, str] | None:
    rows = lake.read("cohort_members", pl.col("cohort") == cohort).select("cohort_version", "membership_hash")
    if rows.height == 0:
        return None
    top = rows.sort("cohort_version").row(-1)
    return int(top[0]), str(top[1])


def snapshot_cohort(lake: Lake, definition: CohortDefinition) -> CohortSnapshot:
    """Select members now; record a new version only if the membership changed."""
    series_version, tags_version = lake.version("series"), lake.version("tags")
    series = without_model_segs(lake.read("series", version=series_version), model_outputs(lake))
    tags = lake.read("tags", version=tags_version)
    members = select_series(series, tags, definition)
    if members.height == 0:
        raise EmptyCohort(
            f"cohort {definition.name!r} matches no series in the index (series table version "
            f"{series_version}); check its filter or ingest data first"
        )
    digest = membership_hash(members)
    previous = latest_version(lake, definition.name)
    if previous and previous[1] == digest:
        return read_cohort(lake, definition.name, previous[0])
    version = (previous[0] + 1) if previous else 1
    labels = _reference_labels(series, members)
    now = dt.datetime.now(dt.timezone.utc)
    rows = [
        {
            "cohort": definition.name,
            "cohort_version": version,
            "series_uid": m["series_uid"],
            "study_uid": m["study_uid"],
            "patient_id": m["patient_id"],
            "reference_seg_series_uids": m["reference_seg_series_uids"] or [],
            "reference_labels": labels[m["series_uid"]],
            "membership_hash": digest,
            "definition_hash": definition.digest(),
            "purpose": definition.purpose,
            "series_table_version": series_version,
            "tags_table_version": tags_version,
            "created_at": now,
        }
        for m in members.iter_rows(named=True)
    ]
    written = lake.merge("cohort_members", pa.Table.from_pylist(rows, schema=COHORT_MEMBERS.schema))
    snapshot = read_cohort(lake, definition.name, version)
    snapshot.created = True
    snapshot.cohort_members_version = written.version
    return snapshot


def read_cohort(lake: Lake, cohort: str, version: int | None = None) -> CohortSnapshot:
    """A cohort version exactly as it was snapshotted: its members, joined with the series
    rows at the series-table version the snapshot read (Delta time travel)."""
    rows = lake.read("cohort_members", pl.col("cohort") == cohort)
    if rows.height == 0:
        raise UnknownCohortVersion(f"cohort {cohort!r} has no snapshot yet; materialize it first")
    version = version if version is not None else int(rows["cohort_version"].max())  # type: ignore[arg-type]
    rows = rows.filter(pl.col("cohort_version") == version)
    if rows.height == 0:
        known = sorted(set(lake.read("cohort_members", pl.col("cohort") == cohort)["cohort_version"].to_list()))
        raise UnknownCohortVersion(f"cohort {cohort!r} has no version {version}; versions: {known}")
    first = rows.row(0, named=True)
    series_version = first["series_table_version"]
    series = lake.read("series", pl.col("series_uid").is_in(rows["series_uid"].implode()), version=series_version)
    members = rows.join(
        series.drop("study_uid", "patient_id", "reference_seg_series_uids"), on="series_uid", how="left"
    ).sort("series_uid")
    return CohortSnapshot(
        cohort=cohort,
        version=version,
        membership_hash=first["membership_hash"],
        purpose=first["purpose"],
        members=members,
        series_table_version=series_version,
        tags_table_version=first["tags_table_version"],
        cohort_members_version=lake.version("cohort_members"),
    )


def cohort_versions(lake: Lake, cohort: str) -> pl.DataFrame:
    return (
        lake.read("cohort_members", pl.col("cohort") == cohort)
        .group_by("cohort_version", "membership_hash", "series_table_version", "definition_hash")
        .agg(pl.len().alias("series"), pl.col("created_at").min())
        .sort("cohort_version")
    )
