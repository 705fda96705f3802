"""The gate between a cohort version and learning from it. Each blocking harmonization check
records its outcome for the version it checked in the lake table `cohort_checks`; export and
training refuse a version with a failed check, naming it. The record lives in the lake, not
only in Dagster's event log, so the same gate holds in a later run, at a federated site and
in the client, none of which sees the run that checked.

A version whose checks never ran (snapshotted without Dagster: the client, a federated site,
the tests) has no record and is not refused; the materialize_cohort job always runs them.
A check run again replaces its record: fixing the definition's tolerances and re-checking
opens the gate for the same version."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from kaapana_assets.lake import Lake
from kaapana_assets.lake.digest import row_digest
from kaapana_assets.lake.schemas import COHORT_CHECKS


class CohortChecksFailed(ValueError):
    """A cohort version failed a blocking check: nothing is exported or trained from it."""

    def __init__(self, cohort: str, version: int, failed: list[CheckRecord]):
        self.cohort, self.version, self.failed = cohort, version, failed
        checks = "; ".join(f"{r.check_name} ({r.description})" for r in failed)
        super().__init__(
            f"cohort {cohort} v{version} failed its blocking check(s) {checks}: nothing is exported or trained "
            f"from it; fix the data or the definition and materialize the cohort again (materialize_cohort)")


@dataclass(frozen=True)
class CheckRecord:
    cohort: str
    cohort_version: int
    check_name: str
    passed: bool
    description: str
    offending_count: int
    definition_hash: str


def record_check(lake: Lake, record: CheckRecord) -> int | None:
    """Write (or replace) a check's outcome for its cohort version; the Delta version written."""
    row = {"cohort": record.cohort, "cohort_version": record.cohort_version, "check_name": record.check_name,
           "passed": record.passed, "description": record.description, "offending_count": record.offending_count,
           "definition_hash": record.definition_hash}
    row = {**row, "row_digest": row_digest(row), "checked_at": dt.datetime.now(dt.timezone.utc)}
    return lake.merge(COHORT_CHECKS, pa.Table.from_pylist([row], schema=COHORT_CHECKS.schema)).version


def check_records(lake: Lake, cohort: str, version: int) -> list[CheckRecord]:
    if not lake.exists(COHORT_CHECKS):
        return []
    rows = lake.read(COHORT_CHECKS, (pl.col("cohort") == cohort) & (pl.col("cohort_version") == version))
    return [CheckRecord(r["cohort"], int(r["cohort_version"]), r["check_name"], bool(r["passed"]),
                        r["description"] or "", int(r["offending_count"] or 0), r["definition_hash"] or "")
            for r in rows.sort("check_name").iter_rows(named=True)]


def require_passed_checks(lake: Lake, cohort: str, version: int) -> list[CheckRecord]:
    """The version's check records, or CohortChecksFailed naming every failed one."""
    records = check_records(lake, cohort, version)
    failed = [r for r in records if not r.passed]
    if failed:
        raise CohortChecksFailed(cohort, version, failed)
    return records
