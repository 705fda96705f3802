"""Where WADO-RS finds an instance: the `instances` table of the index, never the files.

Lookups are cached by the table's Delta version, which is read at most once per
`RECHECK_S`: a study indexed a moment ago is served within that second."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from starlette.exceptions import HTTPException

from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES

RECHECK_S = 1.0
CACHED_LOOKUPS = 4096


@dataclass(frozen=True)
class ArchivedInstance:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    path: Path  # the archived file
    transfer_syntax_uid: str
    instance_number: int | None
    number_of_frames: int | None


@dataclass(frozen=True)
class Selection:
    """What a WADO-RS path names: a study, a series of it, or an instance of that series."""

    study_uid: str
    series_uid: str | None = None
    sop_instance_uid: str | None = None

    def describe(self) -> str:
        if self.sop_instance_uid:
            return f"instance {self.sop_instance_uid} of series {self.series_uid} of study {self.study_uid}"
        if self.series_uid:
            return f"series {self.series_uid} of study {self.study_uid}"
        return f"study {self.study_uid}"


class InstanceIndex:
    def __init__(self, lake: Lake, archive: Path, recheck_s: float = RECHECK_S) -> None:
        self.lake, self.archive, self.recheck_s = lake, archive, recheck_s
        self._lock = threading.Lock()
        self._version: int | None = None
        self._checked = float("-inf")
        self._cache: OrderedDict[Selection, list[ArchivedInstance]] = OrderedDict()

    def version(self) -> int | None:
        """The `instances` table's version (re-read at most once per `recheck_s`); a change
        empties the lookup cache."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.recheck_s:
                return self._version
        version = self.lake.version(INSTANCES)
        with self._lock:
            if version != self._version:
                self._cache.clear()
            self._version, self._checked = version, now
            return version

    def find(self, selection: Selection) -> list[ArchivedInstance]:
        """The instances selected, ordered by series and instance number; 404 when none."""
        self.version()
        with self._lock:
            found = self._cache.get(selection)
            if found is not None:
                self._cache.move_to_end(selection)
                return found
        found = self._read(selection)
        if not found:
            raise HTTPException(404, f"no {selection.describe()} in the archive")
        with self._lock:
            self._cache[selection] = found
            while len(self._cache) > CACHED_LOOKUPS:
                self._cache.popitem(last=False)
        return found

    def _read(self, selection: Selection) -> list[ArchivedInstance]:
        where = pl.col("study_uid") == selection.study_uid
        if selection.series_uid is not None:
            where &= pl.col("series_uid") == selection.series_uid
        if selection.sop_instance_uid is not None:
            where &= pl.col("sop_instance_uid") == selection.sop_instance_uid
        rows = (self.lake.scan(INSTANCES).filter(where)
                .select("study_uid", "series_uid", "sop_instance_uid", "sop_class_uid", "archive_path",
                        "transfer_syntax_uid", "instance_number", "number_of_frames")
                .sort("series_uid", "instance_number", "sop_instance_uid", nulls_last=True).collect())
        return [ArchivedInstance(r["study_uid"], r["series_uid"], r["sop_instance_uid"], r["sop_class_uid"],
                                 self.archive / r["archive_path"], r["transfer_syntax_uid"], r["instance_number"],
                                 r["number_of_frames"]) for r in rows.iter_rows(named=True)]
