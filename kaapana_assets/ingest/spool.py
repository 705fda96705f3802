"""The spool: where received and copied DICOM files wait for ingestion.

Planning for the arrival rules (arrivals.py): which studies are complete (quiet for a
while), which files cannot be read at all (they go to quarantine through a run), and a
content digest per study so that a run is keyed by exactly the files it will ingest.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kaapana_assets.ingest.headers import Rejected, parse_header

UNREADABLE = ""  # study key of files whose header cannot be read or validated
MAX_HEADER_BYTES = 1 << 26  # files larger than 64 MiB are parsed by the run, not the sensor


@dataclass(frozen=True)
class SpoolFile:
    path: str
    size: int
    mtime_ns: int


def scan_spool(root: Path) -> list[SpoolFile]:
    """Entries under root, skipping hidden names and in-flight temp files (the receiver
    writes `.name.part` and renames when durable). Links are listed, never followed (lstat):
    the ingest records them as not_regular_file and removes them."""
    found: list[SpoolFile] = []
    if not root.exists():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or name.endswith((".part", ".tmp")):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:  # ingested or moved meanwhile
                continue
            found.append(SpoolFile(path, st.st_size, st.st_mtime_ns))
    return sorted(found, key=lambda f: f.path)


def study_of_file(path: str) -> str:
    """StudyInstanceUID of a spool file, or UNREADABLE (the full validation decides:
    a file the run would quarantine anyway is routed to quarantine directly)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a link is never followed
    except OSError:
        return UNREADABLE
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return UNREADABLE
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(MAX_HEADER_BYTES)
        return parse_header(data).study_uid
    except (Rejected, OSError):
        return UNREADABLE
    finally:
        os.close(fd)


@dataclass
class SpoolPlan:
    ready: dict[str, list[str]] = field(default_factory=dict)  # study -> files
    unreadable: list[str] = field(default_factory=list)
    waiting: dict[str, int] = field(default_factory=dict)  # study -> files still settling
    digests: dict[str, str] = field(default_factory=dict)  # study (or UNREADABLE) -> digest
    # study -> seconds until it settles (negative: settled that long ago)
    settles_in_s: dict[str, float] = field(default_factory=dict)
    # path -> (size, mtime, study, first seen): the cache for the next tick
    studies_of: dict[str, tuple[int, int, str, int]] = field(default_factory=dict)


def digest(files: Iterable[SpoolFile]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        # surrogateescape: a file name that is not UTF-8 keeps its bytes (no UnicodeEncodeError)
        h.update(f"{f.path}\0{f.size}\0{f.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def plan_spool(
    files: list[SpoolFile],
    known: Mapping[str, tuple[int, int, str, int]],
    now_ns: int,
    quiet_period_s: float,
    previous_scan_ns: int | None = None,
    study_of: Callable[[str], str] = study_of_file,
) -> SpoolPlan:
    """Group files by study; a group is ready when none of its files changed, and none
    appeared, within the quiet period. First-seen times matter because `cp -p` and
    `rsync -a` keep old mtimes: a half-copied study must not look settled. `known` caches
    (size, mtime, study, first seen) per path, so each header is parsed once.

    A new file whose mtime is after the previous scan (`previous_scan_ns`) was written
    since then, and mtime is when: it counts from its mtime rather than from this scan, so a
    study settles one quiet period after its last write, not up to a scan interval later.
    A new file with an older mtime (kept by `cp -p`) may have appeared at any moment since
    the previous scan: it counts from this scan. `study_of` reads a new file's study (its
    header, unless the caller has read it already)."""
    plan = SpoolPlan()
    groups: dict[str, list[SpoolFile]] = {}
    settled_at: dict[str, int] = {}
    for f in files:
        cached = known.get(f.path)
        if cached and cached[0] == f.size and cached[1] == f.mtime_ns:
            study, first_seen = cached[2], cached[3]
        else:
            written_since_last_scan = previous_scan_ns is not None and previous_scan_ns < f.mtime_ns <= now_ns
            study, first_seen = study_of(f.path), f.mtime_ns if written_since_last_scan else now_ns
        plan.studies_of[f.path] = (f.size, f.mtime_ns, study, first_seen)
        groups.setdefault(study, []).append(f)
        settled_at[study] = max(settled_at.get(study, 0), f.mtime_ns, first_seen)
    quiet_ns = int(quiet_period_s * 1e9)
    for study, group in groups.items():
        plan.settles_in_s[study] = (settled_at[study] + quiet_ns - now_ns) / 1e9
        if now_ns - settled_at[study] < quiet_ns:
            plan.waiting[study] = len(group)
            continue
        plan.digests[study] = digest(group)
        paths = [f.path for f in group]
        if study == UNREADABLE:
            plan.unreadable = paths
        else:
            plan.ready[study] = paths
    return plan


def find_study_files(root: Path, study_uid: str) -> list[str]:
    """All spool files of one study (for a run started without a file list, e.g. from the UI)."""
    return [f.path for f in scan_spool(root) if study_of_file(f.path) == study_uid]


def wait_until_quiet(
    root: Path,
    study_uids: Iterable[str],
    quiet_period_s: float,
    max_wait_s: float,
    arrived_after_ns: int | None = None,
) -> dict[str, list[str]] | None:
    """Block until none of the studies' spool files has changed for the quiet period (the
    same rule as the sensor's plan_spool); their files, per study, or None once `max_wait_s`
    passes first. A run started while its studies still arrive calls this, so that its
    start-up overlaps the quiet period instead of following it.

    `arrived_after_ns`: the scan before the one that first saw the studies. A file written
    since counts from its mtime; an older mtime (`cp -p`) counts from this function's first
    scan, as plan_spool does. A study with no file left (ingested meanwhile) is quiet."""
    wanted = list(dict.fromkeys(study_uids))
    known: Mapping[str, tuple[int, int, str, int]] = {}
    previous, deadline = arrived_after_ns, time.monotonic() + max_wait_s
    while True:
        now = time.time_ns()
        plan = plan_spool(scan_spool(root), known, now, quiet_period_s, previous)
        known, previous = plan.studies_of, now
        settling = [plan.settles_in_s[s] for s in wanted if s in plan.waiting]
        if not settling:
            return {s: plan.ready.get(s, []) for s in wanted}
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        # Until the last of them settles, unless a new write postpones it: the next scan tells.
        time.sleep(min(max(max(settling), 0.01), left) + 0.01)
