"""The audit trail: every authenticated access to patient data (a DICOMweb retrieve, a client
read, a run launch) as a row of the `audit` Delta table.

A request never waits on a Delta commit: events are queued and a background thread appends them
every `flush_s` or every `batch` events, whichever comes first; `close` appends what is left."""

from __future__ import annotations

import queue
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import polars as pl
import pyarrow as pa

from kaapana_assets.access.identity import Identity
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import AUDIT


class Action(StrEnum):
    SEARCH = "search"  # a QIDO-RS search (what exists, not the images)
    RETRIEVE = "retrieve"  # WADO-RS: instances, metadata, frames, rendered, bulk data
    CLIENT_READ = "client-read"  # the Python client's read of a series
    RUN_LAUNCH = "run-launch"  # a Dagster run launched through the gateway


class Via(StrEnum):
    DICOMWEB = "dicomweb"
    CLIENT = "client"
    GATEWAY = "gateway"


@dataclass(frozen=True)
class AuditEvent:
    identity: Identity
    action: Action
    via: Via
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    target: str | None = None  # what else was accessed: a run's job and partition
    project: str | None = None  # the project the access was for, when one is named
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def rows(events: list[AuditEvent]) -> pa.Table:
    return pa.Table.from_pylist([{
        "event_id": e.event_id, "user": e.identity.user, "roles": sorted(e.identity.roles),
        "projects": sorted(e.identity.projects), "project": e.project, "action": e.action.value,
        "via": e.via.value, "study_uid": e.study_uid, "series_uid": e.series_uid,
        "sop_instance_uid": e.sop_instance_uid, "target": e.target, "at": e.at,
    } for e in events], schema=AUDIT.schema)


class AuditLog:
    """Appends events to the lake's `audit` table from one background thread."""

    def __init__(self, lake: Lake, flush_s: float = 1.0, batch: int = 500) -> None:
        self.lake, self.flush_s, self.batch = lake, flush_s, batch
        self._queue: queue.Queue[AuditEvent | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._flushed = threading.Condition()
        self._pending = 0

    def record(self, event: AuditEvent) -> None:
        with self._flushed:
            self._pending += 1
        self._queue.put(event)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Append every event recorded so far, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def wait_flushed(self, timeout_s: float = 10.0) -> bool:
        """Whether every event recorded so far is in the table (for tests and shutdown)."""
        with self._flushed:
            return self._flushed.wait_for(lambda: self._pending == 0, timeout_s)

    @contextmanager
    def running(self) -> Iterator[AuditLog]:
        self.start()
        try:
            yield self
        finally:
            self.close()

    def _run(self) -> None:
        held: list[AuditEvent] = []  # events a failed append keeps for the next one
        stop = False
        while not stop:
            events, held = held, []
            if not events:
                first = self._queue.get()
                if first is None:
                    break
                events.append(first)
            # The first event opens a batch: it is appended flush_s later, or when full.
            deadline = time.monotonic() + self.flush_s
            while len(events) < self.batch and not stop:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    more = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                else:
                    events.append(more)
            try:
                self.lake.merge(AUDIT, rows(events))
            except Exception as exc:  # noqa: BLE001 (the trail must survive a failed commit)
                print(f"audit: appending {len(events)} events failed ({exc}); retrying", file=sys.stderr)
                held = events
                if stop:
                    self.lake.merge(AUDIT, rows(events))  # the last chance: fail loudly
                continue
            with self._flushed:
                self._pending -= len(events)
                self._flushed.notify_all()


@dataclass(frozen=True)
class AuditFigures:
    """The audit table at one version: its size, and who did what over the last `window`."""

    version: int | None
    rows: int
    latest_at: datetime | None
    window_rows: int
    window_users: int
    by_user_action: list[dict[str, object]]  # user, action, accesses, projects, last_at; most first


def audit_figures(lake: Lake, window: timedelta = timedelta(hours=24), now: datetime | None = None) -> AuditFigures:
    if not lake.exists(AUDIT):
        return AuditFigures(None, 0, None, 0, 0, [])
    version = lake.version(AUDIT)
    frame = lake.read(AUDIT, version=version)
    since = (now or datetime.now(UTC)) - window
    recent = frame.filter(pl.col("at") >= since)
    grouped = (recent.group_by("user", "action")
               .agg(pl.len().alias("accesses"), pl.col("projects").list.explode().unique().sort().alias("projects"),
                    pl.col("at").max().alias("last_at"))
               .sort(["accesses", "user", "action"], descending=[True, False, False]))
    return AuditFigures(
        version, frame.height, frame["at"].max() if frame.height else None, recent.height,  # type: ignore[arg-type]
        recent["user"].n_unique(),
        [dict(row, projects=", ".join(row["projects"]), last_at=row["last_at"].isoformat())
         for row in grouped.iter_rows(named=True)])
