"""Cohort membership: select series with a definition, snapshot them as a numbered
version, and read any version back exactly (the series rows as they were, by Delta
time travel to the table versions the snapshot recorded)."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from kaapana_assets.cohorts.definitions import CohortDefinition
from kaapana_assets.cohorts.exclusion import excluded_cohorts, without_patients
from kaapana_assets.cohorts.references import annotated, apply_reference_policy, references_digest
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import (
    COHORT_MEMBERS,
    INSTANCES,
    SEG_SEGMENTS,
    SEGMENTATIONS,
    SERIES,
    SERIES_PROJECTS,
    TAGS,
)
from kaapana_assets.projects.membership import DEFAULT_PROJECT, scope_of


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
    # The `instances` version the members' slices are read at (export, evaluation, client,
    # lineage); None for versions cut before it was recorded (they read `instances` as it is).
    instances_table_version: int | None = None
    segmentations_table_version: int | None = None
    excluded_cohorts: dict[str, int] = field(default_factory=dict)  # cohort → version whose patients were left out
    project: str = DEFAULT_PROJECT  # the research project whose series it selected from
    series_projects_table_version: int | None = None  # the project's series as of then (scope_of at this version)

    @property
    def size(self) -> int:
        return self.members.height

    @property
    def patients(self) -> set[str]:
        return set(self.members.select(patient_key()).to_series().to_list())


def patient_key() -> pl.Expr:
    """A member's patient for counting and splitting: its PatientID, or the series itself when
    it has none (it cannot be matched with any other series)."""
    pid = pl.col("patient_id")
    return pl.when(pid.fill_null("") == "").then(pl.col("series_uid")).otherwise(pid).alias("patient")


def with_references(lake: Lake, series: pl.DataFrame, definition: CohortDefinition) -> pl.DataFrame:
    """The series rows with their references for this cohort (cohorts/references.py): only
    accepted reference SEGs listed, each label's source chosen. A study the automation
    segmented is not thereby annotated, and a model never trains on its own predictions."""
    listed = sorted({uid for uids in series["reference_seg_series_uids"].to_list() for uid in uids or []})
    segments = lake.read(SEG_SEGMENTS, pl.col("series_uid").is_in(listed))
    return apply_reference_policy(series, segments, definition.reference_algorithm_types)


def select_series(series: pl.DataFrame, tags: pl.DataFrame, definition: CohortDefinition) -> pl.DataFrame:
    """Image series (not SEG) matching the definition's filter; `has_reference_segmentation`
    reads the references as `with_references` leaves them."""
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
        has = annotated(definition.required_labels)
        frame = frame.filter(has if f.has_reference_segmentation else ~has)
    if f.include_series:
        extra = series.filter(pl.col("series_uid").is_in(f.include_series) & (pl.col("modality") != "SEG"))
        frame = pl.concat([frame, extra]).unique("series_uid", keep="first")
    if f.exclude_series:
        frame = frame.filter(~pl.col("series_uid").is_in(f.exclude_series))
    if f.exclude_tags:
        tagged_out = tags.filter(pl.col("tag").is_in(f.exclude_tags))["series_uid"]
        frame = frame.filter(~pl.col("series_uid").is_in(tagged_out.implode()))
    return frame.sort("series_uid")


def membership_hash(members: pl.DataFrame, label_priority: list[str] | None = None,
                    project: str = DEFAULT_PROJECT) -> str:
    """Hash of who is in, of what their rows say, of the references chosen for them, of the
    overlap rule and of the project: unchanged data, unchanged hash."""
    h = hashlib.sha256()
    if project != DEFAULT_PROJECT:  # a default-project cohort hashes as before projects
        h.update(f"project:{project}\n".encode())
    references = references_digest(members)
    for uid, digest in sorted(zip(members["series_uid"].to_list(), members["row_digest"].to_list(), strict=True)):
        h.update(f"{uid}:{digest}:{references[uid]}\n".encode())
    if label_priority:
        h.update(f"label_priority:{','.join(label_priority)}\n".encode())
    return h.hexdigest()[:24]


def latest_version(lake: Lake, cohort: str) -> tuple[int, str] | None:
    rows = lake.read(COHORT_MEMBERS, pl.col("cohort") == cohort).select("cohort_version", "membership_hash")
    if rows.height == 0:
        return None
    top = rows.sort("cohort_version").row(-1)
    return int(top[0]), str(top[1])


def snapshot_cohort(lake: Lake, definition: CohortDefinition) -> CohortSnapshot:
    """Select members now, from the series of the definition's project only; record a new
    version only if the membership changed."""
    series_version, tags_version = lake.version(SERIES), lake.version(TAGS)
    # Read after `series`: ingest commits slices before the series rows computed from them, and
    # the series' projects after the series rows (a series not yet in a project is left out).
    instances_version, segmentations_version = lake.version(INSTANCES), lake.version(SEGMENTATIONS)
    scope = scope_of(lake, [definition.project], lake.version(SERIES_PROJECTS))
    # The scope first: `include_series` and every filter see only the project's series.
    in_project = pl.col("series_uid").is_in(sorted(scope.series_uids))
    series = with_references(lake, lake.read(SERIES, in_project, version=series_version), definition)
    tags = lake.read(TAGS, version=tags_version)
    members = select_series(series, tags, definition)
    excluded = excluded_cohorts(lake, definition.name, definition.filter.exclude_cohorts)
    members, left_out = without_patients(members, excluded)
    if members.height == 0:
        held_out = (f" after leaving out {left_out} series of patients in "
                    + ", ".join(f"{e.cohort} v{e.version}" for e in excluded)) if left_out else ""
        raise EmptyCohort(
            f"cohort {definition.name!r} matches no series of project {definition.project!r} in the index "
            f"(series table version {series_version}, series_projects version {scope.version}){held_out}; check its "
            "filter or project, or ingest data first"
        )
    digest = membership_hash(members, definition.label_priority, definition.project)
    previous = latest_version(lake, definition.name)
    if previous and previous[1] == digest:
        return read_cohort(lake, definition.name, previous[0])
    version = (previous[0] + 1) if previous else 1
    now = dt.datetime.now(dt.timezone.utc)
    rows = [
        {
            "cohort": definition.name,
            "cohort_version": version,
            "series_uid": m["series_uid"],
            "study_uid": m["study_uid"],
            "patient_id": m["patient_id"],
            "reference_seg_series_uids": m["reference_seg_series_uids"] or [],
            "reference_labels": m["reference_labels"],
            "reference_sources": m["reference_sources"],
            "label_priority": definition.label_priority,
            "membership_hash": digest,
            "definition_hash": definition.digest(),
            "purpose": definition.purpose,
            "series_table_version": series_version,
            "tags_table_version": tags_version,
            "instances_table_version": instances_version,
            "segmentations_table_version": segmentations_version,
            "excluded_cohorts": [{"cohort": e.cohort, "cohort_version": e.version} for e in excluded],
            "created_at": now,
            "project": definition.project,
            "series_projects_table_version": scope.version,
        }
        for m in members.iter_rows(named=True)
    ]
    written = lake.merge(COHORT_MEMBERS, pa.Table.from_pylist(rows, schema=COHORT_MEMBERS.schema))
    snapshot = read_cohort(lake, definition.name, version)
    snapshot.created = True
    snapshot.cohort_members_version = written.version
    return snapshot


def read_cohort(lake: Lake, cohort: str, version: int | None = None) -> CohortSnapshot:
    """A cohort version exactly as it was snapshotted: its members, joined with the series
    rows at the series-table version the snapshot read (Delta time travel)."""
    rows = lake.read(COHORT_MEMBERS, pl.col("cohort") == cohort)
    if rows.height == 0:
        raise UnknownCohortVersion(f"cohort {cohort!r} has no snapshot yet; materialize it first")
    version = version if version is not None else int(rows["cohort_version"].max())  # type: ignore[arg-type]
    rows = rows.filter(pl.col("cohort_version") == version)
    if rows.height == 0:
        known = sorted(set(lake.read(COHORT_MEMBERS, pl.col("cohort") == cohort)["cohort_version"].to_list()))
        raise UnknownCohortVersion(f"cohort {cohort!r} has no version {version}; versions: {known}")
    first = rows.row(0, named=True)
    series_version = first["series_table_version"]
    series = lake.read(SERIES, pl.col("series_uid").is_in(rows["series_uid"].implode()), version=series_version)
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
        cohort_members_version=lake.version(COHORT_MEMBERS),
        instances_table_version=first.get("instances_table_version"),
        segmentations_table_version=first.get("segmentations_table_version"),
        excluded_cohorts={e["cohort"]: e["cohort_version"] for e in first.get("excluded_cohorts") or []},
        project=first.get("project") or DEFAULT_PROJECT,
        series_projects_table_version=first.get("series_projects_table_version"),
    )


def cohort_versions(lake: Lake, cohort: str) -> pl.DataFrame:
    return (
        lake.read(COHORT_MEMBERS, pl.col("cohort") == cohort)
        .group_by("cohort_version", "membership_hash", "series_table_version", "definition_hash")
        .agg(pl.len().alias("series"), pl.col("created_at").min())
        .sort("cohort_version")
    )
