"""Reading and writing the Delta tables: idempotent MERGEs keyed on UIDs, versioned reads.

Writes go through deltalake directly (not an IO manager) because every materialization
records the exact Delta version it wrote, and readers time-travel to versions they read.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from kaapana_assets.lake.schemas import TABLES, TableSpec
from kaapana_assets.lake.store import CONDITIONAL_PUT, check_store, is_s3

if TYPE_CHECKING:
    from kaapana_assets.environment import Environment

log = logging.getLogger(__name__)

# Concurrent runs (one per study, from several pods) may commit to the same table; Delta's
# optimistic concurrency rejects the loser, which re-runs its MERGE against the new state.
# Bounded: a writer that loses this often is starved, and says so rather than spin.
MAX_COMMIT_ATTEMPTS = 8
BACKOFF_S = 0.05  # doubled per attempt, jittered ×0.5–1.5, at most BACKOFF_MAX_S
BACKOFF_MAX_S = 2.0
# A MERGE of up to this many keys names them as a target-only predicate, so deltalake skips
# the data files whose key statistics exclude them: on an object store every file read is a
# request, and a burst of small commits would otherwise read every file of the table each time.
PRUNE_MAX_KEYS = 256


class CommitConflictError(RuntimeError):
    """Every attempt to commit lost against concurrent writers."""


@dataclass(frozen=True)
class WriteResult:
    table: str  # the table's name, as materialization metadata records it
    version: int | None
    inserted: int = 0
    updated: int = 0
    deleted: int = 0


class Lake:
    """The Delta tables of one site. `root` is a local folder or an object-store URI."""

    def __init__(self, root: str | Path, storage_options: dict[str, str] | None = None,
                 unsafe_store_allowed: bool = False):
        self.root = str(root).rstrip("/")
        if is_s3(self.root):
            # Commits by put-if-absent: safe against concurrent writers without a lock table.
            storage_options = {**CONDITIONAL_PUT, **(storage_options or {})}
        self.storage_options = storage_options or None
        self.unsafe_store_allowed = unsafe_store_allowed
        # The latest state of each table this lake wrote, brought up to date before each write
        # (update_incremental reads only the new log entries, not the whole log again). One set
        # per thread, and none across pickling (ingest's worker processes get the lake).
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    @classmethod
    def of(cls, environment: Environment) -> Lake:
        """The lake the environment names: KAAPANA_LAKE_URI with its S3 settings, else <home>/lake."""
        return cls(environment.lake_uri, environment.lake_storage_options, environment.lake_unsafe_store)

    def __repr__(self) -> str:
        return f"Lake({self.root!r})"

    def check_writable(self) -> None:
        """On an object store, refuse to write where commits are unsafe (once per process)."""
        if is_s3(self.root):
            check_store(self.root, self.storage_options or {}, self.unsafe_store_allowed)

    @property
    def is_local(self) -> bool:
        return "://" not in self.root or self.root.startswith("file://")

    def uri(self, table: TableSpec) -> str:
        return f"{self.root}/{table.name}"

    def exists(self, table: TableSpec) -> bool:
        return DeltaTable.is_deltatable(self.uri(table), storage_options=self.storage_options)

    def delta(self, table: TableSpec, version: int | None = None) -> DeltaTable:
        """Open a table, creating it empty with its schema on first use."""
        try:
            return DeltaTable(self.uri(table), version=version, storage_options=self.storage_options)
        except TableNotFoundError:
            if version is not None:
                raise
        self.check_writable()
        if self.is_local:
            Path(self.uri(table)).mkdir(parents=True, exist_ok=True)
        try:
            # No retry: a create that lost version 0 would otherwise commit again as version 1,
            # a second CREATE TABLE in the log and one version more than the writes made.
            return DeltaTable.create(
                self.uri(table), table.schema, mode="ignore", storage_options=self.storage_options,
                commit_properties=CommitProperties(max_commit_retries=0),
            )
        except CommitFailedError:  # another writer created it meanwhile: version 0 is taken
            return DeltaTable(self.uri(table), storage_options=self.storage_options)

    def version(self, table: TableSpec) -> int | None:
        if not self.exists(table):
            return None
        return DeltaTable(self.uri(table), storage_options=self.storage_options).version()

    def versions(self, tables: Sequence[TableSpec] | None = None) -> dict[str, int | None]:
        """Each table's current version (all tables when none are named), keyed by table
        name as materialization metadata records it."""
        return {spec.name: self.version(spec) for spec in (tables or TABLES.values())}

    def merge(self, table: TableSpec, rows: pa.Table) -> WriteResult:
        """MERGE rows keyed on the table's keys: new keys are inserted; for mutable tables,
        rows whose row_digest changed are updated. A MERGE that changes nothing commits
        nothing, so re-running is free and leaves the version as it was."""
        rows = self._unique_keys(rows.select(table.schema.names), table).cast(table.schema)
        if rows.num_rows == 0:
            return WriteResult(table.name, self.version(table))
        on = " AND ".join(f"t.{key} = s.{key}" for key in table.keys)

        on += self._key_filter(rows, table)

        def attempt() -> WriteResult:
            dt = self._current(table)
            # merge_schema: a column added in a later release (series.volume_issue) evolves
            # tables that older homes already hold.
            merger = dt.merge(rows, on, source_alias="s", target_alias="t", merge_schema=True)
            if table.mutable:
                merger = merger.when_matched_update_all(predicate="t.row_digest <> s.row_digest")
            metrics = merger.when_not_matched_insert_all().execute()
            return WriteResult(
                table.name,
                dt.version(),
                inserted=int(metrics.get("num_target_rows_inserted", 0)),
                updated=int(metrics.get("num_target_rows_updated", 0)),
            )

        return self._committed(table, "MERGE", attempt)

    def _current(self, table: TableSpec) -> DeltaTable:
        handles: dict[str, DeltaTable] = self._local.__dict__.setdefault("handles", {})
        handle = handles.get(table.name)
        if handle is None:
            handle = handles[table.name] = self.delta(table)
        else:
            handle.update_incremental()
        return handle

    @staticmethod
    def _key_filter(rows: pa.Table, table: TableSpec) -> str:
        """` AND t.<first key> IN (…)` for a small batch with a string key, else nothing."""
        key = table.keys[0]
        if not pa.types.is_string(table.schema.field(key).type):
            return ""
        values = pl.from_arrow(rows.select([key]))[key].drop_nulls().unique()  # type: ignore[index]
        if not 0 < len(values) <= PRUNE_MAX_KEYS:
            return ""
        quoted = ", ".join("'" + str(v).replace("'", "''") + "'" for v in values.sort())
        return f" AND t.{key} IN ({quoted})"

    def _committed(self, table: TableSpec, operation: str, attempt: Callable[[], Any]) -> Any:
        """Run one commit, again on a conflict with a concurrent writer, at most
        MAX_COMMIT_ATTEMPTS times with jittered exponential backoff; each retry is logged."""
        self.check_writable()
        for number in range(1, MAX_COMMIT_ATTEMPTS + 1):
            try:
                return attempt()
            except CommitFailedError as exc:
                if number == MAX_COMMIT_ATTEMPTS:
                    raise CommitConflictError(
                        f"{operation} into {self.uri(table)} lost against concurrent writers "
                        f"{MAX_COMMIT_ATTEMPTS} times; last conflict: {exc}") from exc
                delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (number - 1)) * random.uniform(0.5, 1.5)
                log.warning("%s into %s conflicted with a concurrent commit (attempt %d of %d), "
                            "retrying in %.2f s: %s", operation, self.uri(table), number,
                            MAX_COMMIT_ATTEMPTS, delay, exc)
                time.sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    def _unique_keys(rows: pa.Table, spec: TableSpec) -> pa.Table:
        """MERGE inserts every unmatched source row, duplicates included: keep the last
        row per key so one batch cannot create two rows for one UID."""
        if rows.num_rows < 2:
            return rows
        # The usual case, checked in polars: pyarrow's group_by and pa.array import pandas
        # on first use (≈0.3 s of a cold ingest).
        keys = pl.from_arrow(rows.select(list(spec.keys)))
        assert isinstance(keys, pl.DataFrame)
        if keys.is_unique().all():
            return rows
        keyed = rows.append_column("__row", pa.array(range(rows.num_rows), pa.int64()))
        last = keyed.group_by(list(spec.keys), use_threads=False).aggregate([("__row", "max")])
        keep = pa.compute.sort_indices(last["__row_max"])
        return rows.take(pa.compute.take(last["__row_max"], keep))

    def delete(self, table: TableSpec, predicate: str) -> WriteResult:
        """Delete rows matching a SQL predicate. Callers build predicates from validated
        values only (UIDs, tag names), never from free text."""
        def attempt() -> WriteResult:
            dt = self._current(table)
            metrics = dt.delete(predicate)
            return WriteResult(table.name, dt.version(), deleted=int(metrics.get("num_deleted_rows", 0)))

        return self._committed(table, "DELETE", attempt)

    def scan(self, table: TableSpec, version: int | None = None) -> pl.LazyFrame:
        """A lazy polars scan; an absent table reads as empty (with its schema)."""
        if not self.exists(table):
            if version is not None:
                raise TableNotFoundError(f"{self.uri(table)} does not exist")
            # from_batches, not Schema.empty_table(): the latter imports pandas (≈0.3 s, paid
            # by every cold ingest whose first read finds no table yet).
            empty = pa.Table.from_batches([], schema=table.schema)
            return pl.from_arrow(empty).lazy()  # type: ignore[union-attr]
        return pl.scan_delta(self.uri(table), version=version, storage_options=self.storage_options)

    def read(
        self, table: TableSpec, where: pl.Expr | None = None, version: int | None = None
    ) -> pl.DataFrame:
        frame = self.scan(table, version)
        if where is not None:
            frame = frame.filter(where)
        return frame.collect()
