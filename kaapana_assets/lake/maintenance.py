"""Delta maintenance: per-study runs leave many small files and a long log. Compact them,
checkpoint the log, and vacuum what no version still needs — with a retention that never
breaks the time travel cohort versions rely on.

Vacuum only knows time: it deletes files that were removed from the table longer ago than
the retention. A file a protected version reads was removed by a *later* commit, so a
retention reaching back to the protected version's own commit keeps every file it needs.
The protected versions are the oldest `series`, `tags`, `instances` and `segmentations`
versions any cohort snapshot recorded (cohort_members.*_table_version): exports, evaluations,
the client and lineage read a version's slices at its pinned `instances` version."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from kaapana_assets.lake.schemas import (
    COHORT_MEMBERS,
    INSTANCES,
    SEGMENTATIONS,
    SERIES,
    SERIES_PROJECTS,
    TAGS,
    TableSpec,
)
from kaapana_assets.lake.tables import Lake

HOUR_MS = 3_600_000


@dataclass(frozen=True)
class MaintenanceReport:
    table: str
    files_before: int
    files_after: int  # data files of the latest version after compaction
    files_on_disk_before: int
    files_on_disk_after: int
    version_before: int
    version_after: int
    retention_hours: float
    protected_version: int | None
    vacuumed: int


def protected_versions(lake: Lake) -> dict[str, int]:
    """table → the oldest version a cohort snapshot reads (time travel must keep working)."""
    if not lake.exists(COHORT_MEMBERS):
        return {}
    members = lake.read(COHORT_MEMBERS)
    protected = {}
    for table, column in ((SERIES, "series_table_version"), (TAGS, "tags_table_version"),
                          (INSTANCES, "instances_table_version"),
                          (SEGMENTATIONS, "segmentations_table_version"),
                          (SERIES_PROJECTS, "series_projects_table_version")):
        if column not in members.columns:  # a lake whose snapshots predate the column
            continue
        versions = members[column].drop_nulls()
        if len(versions):
            protected[table.name] = int(versions.min())  # type: ignore[arg-type]
    return protected


def retention_hours(lake: Lake, table: TableSpec, minimum_hours: float, protected: int | None,
                    now_ms: int | None = None) -> float:
    """At least `minimum_hours`, and far enough back to reach the protected version's commit."""
    if protected is None:
        return minimum_hours
    history = {int(h["version"]): int(h["timestamp"]) for h in lake.delta(table).history()}
    committed = history.get(protected)
    if committed is None:  # its log entry is gone already: keep everything rather than guess
        committed = min(history.values()) if history else 0
    age = ((now_ms or int(time.time() * 1000)) - committed) / HOUR_MS
    return max(minimum_hours, age + 1.0)  # an hour's margin against clock skew


def _files_on_disk(lake: Lake, table: TableSpec) -> int:
    from pathlib import Path

    if not lake.is_local:
        return -1
    return sum(1 for p in Path(lake.uri(table)).rglob("*.parquet"))


def maintain(lake: Lake, table: TableSpec, minimum_retention_hours: float = 168.0,
             protected: int | None = None) -> MaintenanceReport:
    """Compact small files, checkpoint, vacuum (files only; the log stays for time travel)."""
    lake.check_writable()
    delta = lake.delta(table)
    before, version_before, disk_before = len(delta.file_uris()), delta.version(), _files_on_disk(lake, table)
    if before > 1:
        delta.optimize.compact()
    delta = lake.delta(table)
    delta.create_checkpoint()
    retention = retention_hours(lake, table, minimum_retention_hours, protected)
    vacuumed = delta.vacuum(retention_hours=int(retention + 0.999), dry_run=False, enforce_retention_duration=False)
    delta = lake.delta(table)
    return MaintenanceReport(table.name, before, len(delta.file_uris()), disk_before, _files_on_disk(lake, table),
                             version_before, delta.version(), retention, protected, len(vacuumed))


def maintain_lake(lake: Lake, tables: Sequence[TableSpec],
                  minimum_retention_hours: float = 168.0) -> list[MaintenanceReport]:
    protected = protected_versions(lake)
    return [maintain(lake, t, minimum_retention_hours, protected.get(t.name)) for t in tables if lake.exists(t)]
