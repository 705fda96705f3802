"""Patients held out of a cohort. `filter.exclude_cohorts: [liver-train]` leaves out every
series of every patient in the latest version of liver-train when the cohort is snapshotted:
held out is per patient (a second study of a training patient is not unseen data), and the
version read is recorded with the snapshot. The evaluation's held-out check reads the same
patient sets (evaluation/held_out.py)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import COHORT_MEMBERS


class UnknownExcludedCohort(LookupError):
    """A cohort to exclude has no snapshot (yet): its patients are unknown, so nothing is held out."""


@dataclass(frozen=True)
class CohortPatients:
    cohort: str
    version: int
    patients: frozenset[str]  # the version's patient ids (members without one cannot be matched)


def cohort_patients(lake: Lake, cohort: str, version: int | None = None) -> CohortPatients | None:
    """The patients of a cohort version (default: the latest); None when there is no such version."""
    if not lake.exists(COHORT_MEMBERS):
        return None
    rows = lake.read(COHORT_MEMBERS, pl.col("cohort") == cohort).select("cohort_version", "patient_id")
    if rows.height == 0:
        return None
    version = version if version is not None else int(rows["cohort_version"].max())  # type: ignore[arg-type]
    rows = rows.filter(pl.col("cohort_version") == version)
    if rows.height == 0:
        return None
    return CohortPatients(cohort, version, frozenset(rows["patient_id"].drop_nulls().to_list()))


def excluded_cohorts(lake: Lake, cohort: str, names: list[str]) -> list[CohortPatients]:
    """The latest version of each cohort `cohort` excludes; an unknown one is an error (a held-out
    cohort cut before its training cohort would hold nothing out)."""
    found = []
    for name in names:
        patients = cohort_patients(lake, name)
        if patients is None:
            raise UnknownExcludedCohort(
                f"cohort {cohort!r} excludes the patients of cohort {name!r}, which has no snapshot in this lake; "
                f"materialize {name} first")
        found.append(patients)
    return found


def without_patients(members: pl.DataFrame, excluded: list[CohortPatients]) -> tuple[pl.DataFrame, int]:
    """The members whose patient is in none of the excluded cohorts, and how many series were left out."""
    patients = sorted(set().union(*(e.patients for e in excluded))) if excluded else []
    if not patients:
        return members, 0
    kept = members.filter(~pl.col("patient_id").is_in(patients).fill_null(False))
    return kept, members.height - kept.height
