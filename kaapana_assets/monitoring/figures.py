"""What a site tells the hub's network monitor, and how the hub checks it.

At the site (the statistics step's site handler calls `site_answer`): aggregates of the
site's own lake — patients, studies, series and instances per modality, manufacturer and
body part; patients by sex and age; series by slice thickness; quarantined files by reason;
cohort sizes; the time of the last ingest — with small cells suppressed before anything
leaves. At the hub (its hub handler calls `parse_answer`): the answer is refused unless every
cell is a known metric, dimension and category, and every count is either 0, at least the
threshold, or a suppression marker.

Suppression (at the site): a count from 1 to threshold-1 is sent as "<threshold" (with the
default 5: counts 1–4 as "<5"). Where the cells of a dimension add up to a total that is
published too (patients by sex or age, series and instances by modality, manufacturer and
body part, series by slice thickness, quarantined files by reason), a lone suppressed cell
could be recovered by subtraction; so further cells, smallest first, are withheld as
">=threshold" until at least two are withheld and they add up to at least the threshold.

Plain module: no Dagster, no Flower.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

from kaapana_assets.federation.guard import MAX_THRESHOLD, small_cell_marker
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import COHORT_MEMBERS, INSTANCES, QUARANTINE, SERIES, STUDIES
from kaapana_assets.projects.membership import DEFAULT_PROJECT, scope_of

EXPERIMENT = "network-statistics"  # the channel's experiment name for statistics messages (hub folder too)
STEP = "statistics"  # the step's name on the federation's transport (steps.py)
FORMAT_VERSION = 1
MAX_CELLS = 20_000
MAX_CATEGORY_LENGTH = 64

ALL = "all"
UNKNOWN = "unknown"
METRICS = ("patients", "studies", "series", "instances", "quarantined", "cohort_series", "cohort_patients")
DIMENSIONS = ("all", "modality", "manufacturer", "body_part", "sex", "age", "slice_thickness", "reason", "cohort")
SERIES_DIMENSIONS = ("modality", "manufacturer", "body_part")

# (metric, dimension) whose cells partition the metric's total: complementary suppression.
PARTITIONS = frozenset({
    ("patients", "sex"), ("patients", "age"),
    ("series", "modality"), ("series", "manufacturer"), ("series", "body_part"), ("series", "slice_thickness"),
    ("instances", "modality"), ("instances", "manufacturer"), ("instances", "body_part"),
    ("quarantined", "reason"),
})

AGE_BINS: tuple[tuple[int, int | None, str], ...] = tuple(
    (low, low + 10, f"{low}-{low + 9}") for low in range(0, 90, 10)) + ((90, None, "90+"),)
THICKNESS_BINS: tuple[tuple[float, float | None, str], ...] = (
    (0.0, 1.0, "0-1"), (1.0, 2.0, "1-2"), (2.0, 3.0, "2-3"), (3.0, 5.0, "3-5"), (5.0, 10.0, "5-10"), (10.0, None, "10+"))
SEXES = ("F", "M", "O")

CellKey = tuple[str, str, str]  # metric, dimension, category
Reported = int | str  # a count, or a suppression marker

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class AnswerRefused(ValueError):
    """A site's answer the hub does not store: malformed, or a small cell in the clear."""


def primary_marker(threshold: int) -> str:
    return small_cell_marker(threshold)


def complementary_marker(threshold: int) -> str:
    return f">={threshold}"


def category(value: object) -> str:
    """A DICOM free-text value as a category: stripped, no control characters, at most 64
    characters; empty or absent is "unknown"."""
    text = _CONTROL.sub("", str(value)).strip()[:MAX_CATEGORY_LENGTH] if value is not None else ""
    return text or UNKNOWN


def age_bin(birth_date: str | None, study_date: str | None) -> str:
    try:
        born = dt.datetime.strptime(str(birth_date), "%Y%m%d").date()
        seen = dt.datetime.strptime(str(study_date), "%Y%m%d").date()
    except ValueError:
        return UNKNOWN
    years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    for low, high, label in AGE_BINS:
        if years >= low and (high is None or years < high):
            return label
    return UNKNOWN  # born after the study: not an age


def thickness_bin(value: float | None) -> str:
    if value is None or value != value or value < 0:  # null, NaN, negative
        return UNKNOWN
    for low, high, label in THICKNESS_BINS:
        if value >= low and (high is None or value < high):
            return label
    return UNKNOWN


@dataclass(frozen=True)
class SiteFigures:
    """A site's own figures, before suppression: they never leave the site as they are."""

    cells: dict[CellKey, int]
    last_ingest_at: dt.datetime | None


def _latest_cohorts(members: pl.DataFrame) -> pl.DataFrame:
    if not members.height:
        return members
    latest = members.group_by("cohort").agg(pl.col("cohort_version").max().alias("_latest"))
    return members.join(latest, on="cohort").filter(pl.col("cohort_version") == pl.col("_latest"))


def compute_figures(lake: Lake, project: str | None = None) -> SiteFigures:
    """Every cell of the site's aggregates from its own lake (unsuppressed); of one research
    project's series, studies and cohorts only when `project` is given (quarantined files
    were never indexed, so they belong to no project: 0 there)."""
    series = lake.read(SERIES)
    studies = lake.read(STUDIES)
    quarantine = lake.read(QUARANTINE)
    members = _latest_cohorts(lake.read(COHORT_MEMBERS))
    if project is not None:
        scope = scope_of(lake, [project])
        series = series.filter(pl.col("series_uid").is_in(sorted(scope.series_uids)))
        studies = studies.filter(pl.col("study_uid").is_in(sorted(scope.study_uids)))
        quarantine = quarantine.clear()
        # Versions cut before cohorts had projects belong to the default project.
        members = members.filter(pl.col("project").fill_null(DEFAULT_PROJECT) == project) \
            if "project" in members.columns else members.clear()
    cells: dict[CellKey, int] = {}

    cells[("patients", ALL, ALL)] = int(studies["patient_id"].n_unique()) if studies.height else 0
    cells[("studies", ALL, ALL)] = studies.height
    cells[("series", ALL, ALL)] = series.height
    cells[("instances", ALL, ALL)] = int(series["instance_count"].sum() or 0) if series.height else 0

    for dimension in SERIES_DIMENSIONS:
        if not series.height:
            break
        frame = series.with_columns(pl.col(dimension).fill_null("").map_elements(category, return_dtype=pl.String)
                                    .alias("_category"))
        grouped = frame.group_by("_category").agg(
            pl.col("patient_id").n_unique().alias("patients"), pl.col("study_uid").n_unique().alias("studies"),
            pl.len().alias("series"), pl.col("instance_count").sum().alias("instances"))
        for row in grouped.iter_rows(named=True):
            for metric in ("patients", "studies", "series", "instances"):
                cells[(metric, dimension, row["_category"])] = int(row[metric] or 0)

    # Sex and age per patient, as of the patient's latest study.
    for label in SEXES:
        cells[("patients", "sex", label)] = 0
    for *_, label in AGE_BINS:
        cells[("patients", "age", label)] = 0
    latest: dict[object, dict[str, Any]] = {}
    for row in studies.sort(["study_date", "study_uid"], nulls_last=False).iter_rows(named=True):
        previous = latest.get(row["patient_id"], {})
        latest[row["patient_id"]] = {**row, "patient_sex": row["patient_sex"] or previous.get("patient_sex"),
                                     "patient_birth_date": row["patient_birth_date"]
                                     or previous.get("patient_birth_date")}
    for row in latest.values():
        sex = str(row["patient_sex"] or "").strip().upper()
        sex = sex if sex in SEXES else UNKNOWN
        cells[("patients", "sex", sex)] = cells.get(("patients", "sex", sex), 0) + 1
        age = age_bin(row["patient_birth_date"], row["study_date"])
        cells[("patients", "age", age)] = cells.get(("patients", "age", age), 0) + 1

    for *_, label in THICKNESS_BINS:
        cells[("series", "slice_thickness", label)] = 0
    for value in series["slice_thickness"].to_list() if series.height else []:
        key = ("series", "slice_thickness", thickness_bin(value))
        cells[key] = cells.get(key, 0) + 1

    cells[("quarantined", ALL, ALL)] = quarantine.height
    for reason, count in quarantine.group_by("reason").len().iter_rows() if quarantine.height else []:
        key = ("quarantined", "reason", category(reason))
        cells[key] = cells.get(key, 0) + int(count)

    if members.height:
        for cohort, size, patients in members.group_by("cohort").agg(
                pl.len().alias("series"), pl.col("patient_id").n_unique().alias("patients")).iter_rows():
            cells[("cohort_series", "cohort", category(cohort))] = int(size)
            cells[("cohort_patients", "cohort", category(cohort))] = int(patients)

    last = None
    if lake.exists(INSTANCES):
        value = lake.scan(INSTANCES).select(pl.col("ingested_at").max()).collect().item()
        if isinstance(value, dt.datetime):
            # To the minute: when the site last ingested, not when a patient's file arrived.
            last = (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).replace(second=0, microsecond=0)
    return SiteFigures(cells, last)


def suppress(cells: Mapping[CellKey, int], threshold: int) -> dict[CellKey, Reported]:
    """Small cells as "<threshold"; complementary cells as ">=threshold" (module docstring)."""
    if not 1 <= threshold <= MAX_THRESHOLD:
        raise ValueError(f"threshold {threshold} is outside 1..{MAX_THRESHOLD}")
    out: dict[CellKey, Reported] = {key: primary_marker(threshold) if 0 < n < threshold else int(n)
                                    for key, n in cells.items()}
    groups: dict[tuple[str, str], list[CellKey]] = defaultdict(list)
    for key in cells:
        groups[(key[0], key[1])].append(key)
    for group, keys in sorted(groups.items()):
        if group not in PARTITIONS or not isinstance(out.get((group[0], ALL, ALL)), int):
            continue  # not a partition of a published total (a suppressed total hides every cell anyway)
        while True:
            hidden = [k for k in keys if isinstance(out[k], str)]
            if not hidden or (len(hidden) >= 2 and sum(cells[k] for k in hidden) >= threshold):
                break
            candidates = sorted((k for k in keys if isinstance(out[k], int) and cells[k] > 0),
                                key=lambda k: (cells[k], k))
            if not candidates:
                break
            out[candidates[0]] = complementary_marker(threshold)
    return out


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class SiteAnswer:
    """A site's answer as it travels (JSON) and as the hub keeps it."""

    site: str
    computed_at: dt.datetime
    threshold: int
    last_ingest_at: dt.datetime | None
    cells: dict[CellKey, Reported]
    project: str | None = None  # the research project the figures count; None: the whole site

    def to_json(self) -> dict[str, Any]:
        answer = {"version": FORMAT_VERSION, "site": self.site, "computed_at": _iso(self.computed_at),
                  "threshold": self.threshold, "last_ingest_at": _iso(self.last_ingest_at),
                  "cells": [[m, d, c, v] for (m, d, c), v in sorted(self.cells.items())]}
        return answer if self.project is None else {**answer, "project": self.project}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    def count(self, key: CellKey) -> int | None:
        value = self.cells.get(key, 0)
        return value if isinstance(value, int) else None

    @property
    def suppressed_cells(self) -> int:
        return sum(1 for v in self.cells.values() if isinstance(v, str))


def site_answer(lake: Lake, site: str, threshold: int, now: dt.datetime | None = None,
                project: str | None = None) -> SiteAnswer:
    """The site's aggregates (of one project's series, when given) with small cells
    suppressed: all that leaves the site."""
    figures = compute_figures(lake, project)
    return SiteAnswer(site, (now or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0), threshold,
                      figures.last_ingest_at, suppress(figures.cells, threshold), project)


def _timestamp(value: object, name: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(str(value))
    except ValueError:
        raise AnswerRefused(f"{name} is not an ISO timestamp") from None
    if parsed.tzinfo is None:
        raise AnswerRefused(f"{name} has no time zone")
    return parsed


def parse_answer(data: str | Mapping[str, Any], site: str, threshold: int, project: str | None = None) -> SiteAnswer:
    """A site's answer, checked: AnswerRefused unless it is well-formed, from `site`, of the
    requested project (or the whole site) and suppressed with at least the requested threshold."""
    try:
        answer = json.loads(data) if isinstance(data, str) else dict(data)
    except ValueError as exc:
        raise AnswerRefused(f"not JSON: {exc}") from None
    if not isinstance(answer, dict) or answer.get("version") != FORMAT_VERSION:
        raise AnswerRefused(f"not a version {FORMAT_VERSION} statistics answer")
    if answer.get("site") != site:
        raise AnswerRefused(f"answer claims site {str(answer.get('site'))[:80]!r}, expected {site!r}")
    if answer.get("project") != project:
        raise AnswerRefused(f"answer counts project {str(answer.get('project'))[:80]!r}, the hub asked for "
                            f"{project!r}")
    applied = answer.get("threshold")
    if not isinstance(applied, int) or isinstance(applied, bool) or not threshold <= applied <= MAX_THRESHOLD:
        raise AnswerRefused(f"suppressed with threshold {applied!r}, the hub asked for at least {threshold}")
    computed_at = _timestamp(answer.get("computed_at"), "computed_at")
    last = answer.get("last_ingest_at")
    last_ingest_at = None if last is None else _timestamp(last, "last_ingest_at")
    raw = answer.get("cells")
    if not isinstance(raw, list) or len(raw) > MAX_CELLS:
        raise AnswerRefused(f"cells must be a list of at most {MAX_CELLS}")
    markers = {primary_marker(applied), complementary_marker(applied)}
    cells: dict[CellKey, Reported] = {}
    for cell in raw:
        if not (isinstance(cell, list) and len(cell) == 4 and all(isinstance(x, str) for x in cell[:3])):
            raise AnswerRefused(f"malformed cell {str(cell)[:80]}")
        metric, dimension, label, value = cell
        if metric not in METRICS or dimension not in DIMENSIONS:
            raise AnswerRefused(f"unknown cell {metric}/{dimension}")
        if category(label) != label:
            raise AnswerRefused(f"category {label[:80]!r} is not a category")
        if isinstance(value, bool) or not (isinstance(value, int) and (value == 0 or value >= applied)
                                           or isinstance(value, str) and value in markers):
            raise AnswerRefused(f"cell {metric}/{dimension}/{label} = {str(value)[:20]!r}: a small count "
                                f"in the clear, or not a count (threshold {applied})")
        if (metric, dimension, label) in cells:
            raise AnswerRefused(f"cell {metric}/{dimension}/{label} twice")
        cells[(metric, dimension, label)] = value
    return SiteAnswer(site, computed_at, applied, last_ingest_at, cells, project)


__all__ = ["ALL", "EXPERIMENT", "METRICS", "STEP", "AnswerRefused", "SiteAnswer",
           "SiteFigures", "compute_figures", "parse_answer", "site_answer", "suppress"]
