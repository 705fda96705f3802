"""The arrival rules: which runs the spool's files get. Plain Python — the `incoming_studies`
sensor (sensors/incoming.py) scans, asks Dagster what it knows, calls `plan_runs` and turns
its PlannedRuns into RunRequests.

A new study gets its run as soon as its first files are seen (`early_start`, the default):
the run starts up (process, imports, and with a model the predictor's imports) while the study
still arrives, waits in its ingest step until the files have been quiet for the quiet period,
then ingests and segments. Start-up overlaps the quiet period instead of following it, on a
laptop (seconds) as on Kubernetes (a pod). New studies first seen in the same tick share one
run over their partition range. Anything else — files of a study that is already a partition
(late instances), what a finished early run left, `early_start` off — gets a run once quiet,
with its file list: one run per study, or one over the range of new studies that settle
together (a burst), up to `studies_per_run` per run. A burst run that fails for good is split:
each of its studies gets a run of its own, so one bad study holds up no other. Unreadable
files get a quarantine run."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from kaapana_assets.ingest.spool import UNREADABLE, SpoolFile, SpoolPlan, plan_spool, study_of_file

# Studies copied one after the other settle a little apart (their last writes): those settling
# within BURST_JOIN_S of a ready one are ready with it (their quiet period is at most that much
# shorter); a ready study waits up to BURST_WINDOW_S (the next tick) for others about to
# settle. Either way a burst becomes one run rather than several.
BURST_JOIN_S = 1.0
BURST_WINDOW_S = 3.0

Seen = tuple[int, int, str, int]  # a spool file's size, mtime (ns), study and first sight (ns)


@dataclass(frozen=True)
class ArrivalCursor:
    """What the sensor remembers between ticks; stored as JSON with the keys below (the
    cursors that running instances have stored keep loading)."""

    files: Mapping[str, Seen] = field(default_factory=dict)  # path → Seen: each header is parsed once
    requested: Mapping[str, str] = field(default_factory=dict)  # study (or UNREADABLE) → digest of its run's files
    bursts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # burst id → its run's studies
    early: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # early tag → its run's studies
    scanned_ns: int | None = None  # when the previous tick scanned the spool

    @classmethod
    def from_json(cls, text: str | None) -> ArrivalCursor:
        data = json.loads(text) if text else {}
        return cls(
            files={path: (int(v[0]), int(v[1]), str(v[2]), int(v[3])) for path, v in data.get("files", {}).items()},
            requested=dict(data.get("requested", {})),
            bursts={burst: tuple(studies) for burst, studies in data.get("bursts", {}).items()},
            early={tag: tuple(studies) for tag, studies in data.get("early", {}).items()},
            scanned_ns=data.get("scanned_ns"),
        )

    def to_json(self) -> str:
        return json.dumps({
            "files": {path: list(seen) for path, seen in self.files.items()},
            "requested": dict(self.requested),
            "bursts": {burst: list(studies) for burst, studies in self.bursts.items()},
            "early": {tag: list(studies) for tag, studies in self.early.items()},
            "scanned_ns": self.scanned_ns,
        })


def read_studies(files: Iterable[SpoolFile], cursor: ArrivalCursor) -> dict[str, str]:
    """The study of every file: the cursor's while the file's size and mtime are unchanged,
    else from its header (UNREADABLE when it cannot be read or validated)."""
    studies: dict[str, str] = {}
    for f in files:
        seen = cursor.files.get(f.path)
        unchanged = seen is not None and seen[0] == f.size and seen[1] == f.mtime_ns
        studies[f.path] = seen[2] if seen is not None and unchanged else study_of_file(f.path)
    return studies


class RunOutcome(Enum):
    PENDING = "pending"  # not launched yet, queued, running, or failed with a retry to come
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # failed for good, or canceled


@dataclass(frozen=True)
class SpoolScan:
    """What the sensor saw this tick: the spool's files and the study of each, which of those
    studies are partitions already, and how the runs the cursor waits for (its early tags
    and burst ids) stand — one missing is PENDING."""

    files: tuple[SpoolFile, ...]
    studies: Mapping[str, str]  # path → study (UNREADABLE: a file that cannot be read)
    partitions: frozenset[str] = frozenset()
    runs: Mapping[str, RunOutcome] = field(default_factory=dict)


@dataclass(frozen=True)
class ArrivalRules:
    quiet_period_s: float  # a study is complete once its files are unchanged this long
    early_start: bool = True  # a new study's run starts as its first files arrive
    studies_per_run: int = 10


class RunKind(Enum):
    EARLY = "early"  # new studies still arriving, no file list: the run waits for quiet itself
    AFTER_BURST = "after-burst"  # one study of a burst whose run failed for good
    BURST = "burst"  # new studies that settled together: one run over their partition range
    STUDY = "study"  # one settled study: a new one, or late files of a known one
    QUARANTINE = "quarantine"  # the unreadable files


@dataclass(frozen=True)
class PlannedRun:
    kind: RunKind
    run_key: str
    studies: tuple[str, ...]  # its partitions, in order (a range when more than one); none for quarantine
    files: tuple[str, ...] = ()  # what it ingests (or quarantines); none for an early run
    tag: str = ""  # EARLY: its early tag; BURST and AFTER_BURST: the burst id
    await_quiet_s: float = 0.0  # EARLY: the quiet period the run waits for
    arrived_after_ns: int = 0  # EARLY: the scan before the one that first saw its studies (0: none)


@dataclass(frozen=True)
class ArrivalPlan:
    runs: list[PlannedRun]
    cursor: ArrivalCursor
    new_partitions: list[str]  # to add in this order, so consecutive new studies form a range
    failed_bursts: Mapping[str, tuple[str, ...]]  # burst id → studies, split this tick
    skip_reason: str | None  # why there is no run, when there is none


def _burst_id(digests: list[str]) -> str:
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def _chunks(studies: list[str], size: int) -> list[list[str]]:
    return [studies[start:start + size] for start in range(0, len(studies), size)]


def plan_runs(cursor: ArrivalCursor, scan: SpoolScan, now_ns: int, rules: ArrivalRules) -> ArrivalPlan:
    """The runs for this tick's spool, and the cursor for the next tick."""
    requested = dict(cursor.requested)
    files = list(scan.files)

    # Runs started early: while one runs, its studies get no other run; once it ended, what
    # of them is still in the spool goes the quiet-period way.
    early = dict(cursor.early)
    in_flight: set[str] = set()
    for tag, studies in cursor.early.items():
        if scan.runs.get(tag, RunOutcome.PENDING) is RunOutcome.PENDING:
            in_flight.update(studies)
        else:
            del early[tag]

    def spool_plan(known: Mapping[str, Seen], at_ns: int, previous_scan_ns: int | None = None) -> SpoolPlan:
        return plan_spool(files, known, at_ns, rules.quiet_period_s, previous_scan_ns, study_of=scan.studies.__getitem__)

    plan = spool_plan(cursor.files, now_ns, cursor.scanned_ns)
    # New studies still arriving: their run starts now (ready ones take the path below, with
    # their file list).
    fresh = [s for s in sorted(plan.waiting) if s != UNREADABLE and s not in in_flight
             and s not in scan.partitions] if rules.early_start else []
    waiting = [s for s in plan.waiting if s != UNREADABLE and s not in in_flight and s not in fresh]

    def pending_of(plan: SpoolPlan) -> list[str]:
        return [s for s in sorted(plan.ready) if requested.get(s) != plan.digests[s] and s not in in_flight]

    pending = pending_of(plan)
    if pending and any(0 < plan.settles_in_s[s] <= BURST_JOIN_S for s in waiting):
        plan = spool_plan(plan.studies_of, now_ns + int(BURST_JOIN_S * 1e9))
        pending = [s for s in pending_of(plan) if s not in fresh]

    about_to_settle = [s for s in waiting if s in plan.waiting and plan.settles_in_s[s] <= BURST_WINDOW_S]
    if pending and about_to_settle and max(-plan.settles_in_s[s] for s in pending) < BURST_WINDOW_S:
        pending = []  # next tick, together with them
    new_partitions = [s for s in pending if s not in scan.partitions]

    # Bursts whose run failed for good: one run per study (what is indexed already is reused).
    bursts = dict(cursor.bursts)
    failed_bursts: dict[str, tuple[str, ...]] = {}
    for burst, studies in cursor.bursts.items():
        outcome = scan.runs.get(burst, RunOutcome.PENDING)
        if outcome is not RunOutcome.PENDING:
            del bursts[burst]
            if outcome is RunOutcome.FAILED:
                failed_bursts[burst] = studies

    runs: list[PlannedRun] = []
    # Early runs: no file list (the files are still coming); the run waits for quiet itself.
    for chunk in _chunks(fresh, rules.studies_per_run):
        tag = _burst_id([f"{s}@{now_ns}" for s in chunk])
        runs.append(PlannedRun(RunKind.EARLY, f"early:{tag}", tuple(chunk), tag=tag,
                               await_quiet_s=rules.quiet_period_s, arrived_after_ns=cursor.scanned_ns or 0))
        early[tag] = tuple(chunk)

    for burst, studies in failed_bursts.items():
        for study_uid in studies:
            runs.append(PlannedRun(RunKind.AFTER_BURST, f"{study_uid}:after-burst:{burst}", (study_uid,),
                                   tuple(plan.ready.get(study_uid, [])), tag=burst))

    # New partitions are added in this order, so consecutive new studies form a partition range.
    for chunk in _chunks(new_partitions, rules.studies_per_run):
        if len(chunk) < 2:
            continue
        burst = _burst_id([plan.digests[s] for s in chunk])
        runs.append(PlannedRun(RunKind.BURST, f"burst:{burst}", tuple(chunk),
                               tuple(f for s in chunk for f in plan.ready[s]), tag=burst))
        bursts[burst] = tuple(chunk)
        for study_uid in chunk:
            requested[study_uid] = plan.digests[study_uid]
    for study_uid in pending:
        digest = plan.digests[study_uid]
        if requested.get(study_uid) == digest:
            continue  # in a burst above
        runs.append(PlannedRun(RunKind.STUDY, f"{study_uid}:{digest}", (study_uid,), tuple(plan.ready[study_uid])))
        requested[study_uid] = digest
    if plan.unreadable and requested.get(UNREADABLE) != plan.digests[UNREADABLE]:
        runs.append(PlannedRun(RunKind.QUARANTINE, f"quarantine:{plan.digests[UNREADABLE]}", (),
                               tuple(plan.unreadable)))
        requested[UNREADABLE] = plan.digests[UNREADABLE]

    # Forget what left the spool, so the cursor stays as small as the spool.
    present = set(plan.ready) | set(plan.waiting) | ({UNREADABLE} if plan.unreadable else set())
    next_cursor = ArrivalCursor(files=plan.studies_of, requested={k: v for k, v in requested.items() if k in present},
                                bursts=bursts, early=early, scanned_ns=now_ns)
    skip = None
    if not runs:
        settling = [s for s in plan.waiting if s not in in_flight]
        skip = (
            f"waiting for {len(settling)} stud(ies) to settle" if settling
            else f"{len(in_flight)} stud(ies) in runs started as they arrived" if in_flight
            else "no new complete study in the spool"
        )
    return ArrivalPlan(runs=runs, cursor=next_cursor, new_partitions=fresh + new_partitions,
                       failed_bursts=failed_bursts, skip_reason=skip)
