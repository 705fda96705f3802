"""The arrival rules (kaapana_assets/ingest/arrivals.py) without Dagster: a spool described
by its files and their studies, ticks at chosen times, the runs each tick plans."""

from __future__ import annotations

import json

from kaapana_assets.ingest.arrivals import (
    BURST_JOIN_S,
    BURST_WINDOW_S,
    ArrivalCursor,
    ArrivalPlan,
    ArrivalRules,
    RunKind,
    RunOutcome,
    SpoolScan,
    plan_runs,
)
from kaapana_assets.ingest.spool import UNREADABLE, SpoolFile

S = 10**9  # ns per second
T0 = 1_700_000_000 * S
QUIET_S = 10.0
QUIET = ArrivalRules(quiet_period_s=QUIET_S, early_start=False, studies_per_run=10)
EARLY = ArrivalRules(quiet_period_s=QUIET_S, early_start=True, studies_per_run=10)


class Spool:
    """Files and the study of each, as the sensor would have read them."""

    def __init__(self) -> None:
        self.files: dict[str, SpoolFile] = {}
        self.studies: dict[str, str] = {}

    def copy(self, study: str, count: int = 2, mtime_ns: int = T0 - 3600 * S, name: str = "") -> list[str]:
        """`count` files of `study`; by default with old mtimes, as `cp -p` keeps them."""
        paths = [f"/spool/{name or study}/{len(self.files) + i}.dcm" for i in range(count)]
        for path in paths:
            self.files[path] = SpoolFile(path, 1000, mtime_ns)
            self.studies[path] = study
        return paths

    def remove(self, study: str) -> None:
        for path in [p for p, s in self.studies.items() if s == study]:
            del self.files[path], self.studies[path]

    def scan(self, partitions: set[str] | None = None, runs: dict[str, RunOutcome] | None = None) -> SpoolScan:
        return SpoolScan(tuple(sorted(self.files.values(), key=lambda f: f.path)), dict(self.studies),
                         frozenset(partitions or ()), runs or {})


def tick(spool: Spool, cursor: ArrivalCursor, at_s: float, rules: ArrivalRules = QUIET,
         partitions: set[str] | None = None, runs: dict[str, RunOutcome] | None = None) -> ArrivalPlan:
    plan = plan_runs(cursor, spool.scan(partitions, runs), T0 + int(at_s * S), rules)
    # What the sensor stores is what the next tick reads.
    assert ArrivalCursor.from_json(plan.cursor.to_json()) == plan.cursor
    return plan


def kinds(plan: ArrivalPlan) -> list[tuple[RunKind, tuple[str, ...]]]:
    return [(run.kind, run.studies) for run in plan.runs]


def test_a_study_waits_for_its_quiet_period_then_gets_one_run() -> None:
    spool = Spool()
    files = spool.copy("1.2.1")
    first = tick(spool, ArrivalCursor(), 0)
    assert first.runs == [] and first.skip_reason == "waiting for 1 stud(ies) to settle"
    assert tick(spool, first.cursor, QUIET_S - 0.5).runs == []  # first sight counts, not the old mtime
    ready = tick(spool, first.cursor, QUIET_S + 1)
    [run] = ready.runs
    assert (run.kind, run.studies, run.files) == (RunKind.STUDY, ("1.2.1",), tuple(files))
    assert run.run_key.startswith("1.2.1:") and ready.new_partitions == ["1.2.1"]
    # No duplicate: the same files are requested already.
    again = tick(spool, ready.cursor, QUIET_S + 2, partitions={"1.2.1"})
    assert again.runs == [] and again.skip_reason == "no new complete study in the spool"


def test_a_file_written_since_the_last_scan_counts_from_its_mtime() -> None:
    spool = Spool()
    first = tick(spool, ArrivalCursor(), 0)  # the scan before the study arrives
    spool.copy("1.2.1", mtime_ns=T0 + 1 * S)
    settling = tick(spool, first.cursor, 5)
    assert settling.runs == []
    # Settled one quiet period after its last write, although first seen at 5 s.
    assert kinds(tick(spool, settling.cursor, QUIET_S + 1.5)) == [(RunKind.STUDY, ("1.2.1",))]


def test_new_files_of_a_requested_study_are_a_new_run_once_quiet() -> None:
    spool = Spool()
    spool.copy("1.2.1")
    spool.copy("1.2.2")
    ready = tick(spool, tick(spool, ArrivalCursor(), 0).cursor, QUIET_S + 1)
    known = {"1.2.1", "1.2.2"}
    late = spool.copy("1.2.1", count=1, mtime_ns=T0 + 12 * S)
    settling = tick(spool, ready.cursor, 13, partitions=known)
    assert settling.runs == [] and settling.skip_reason == "waiting for 1 stud(ies) to settle"
    again = tick(spool, settling.cursor, 12 + QUIET_S + 0.5, partitions=known)
    [run] = again.runs
    assert (run.kind, run.studies) == (RunKind.STUDY, ("1.2.1",)) and late[0] in run.files
    assert again.new_partitions == []  # a known study: no partition to add


def test_studies_that_settle_together_are_one_burst_over_their_range() -> None:
    spool = Spool()
    for uid in ("1.2.3", "1.2.1", "1.2.2"):
        spool.copy(uid)
    ready = tick(spool, tick(spool, ArrivalCursor(), 0).cursor, QUIET_S + 1)
    [run] = ready.runs
    assert run.kind is RunKind.BURST and run.studies == ("1.2.1", "1.2.2", "1.2.3")
    assert run.run_key == f"burst:{run.tag}" and len(run.files) == 6
    assert ready.new_partitions == ["1.2.1", "1.2.2", "1.2.3"]  # in range order
    assert dict(ready.cursor.bursts) == {run.tag: run.studies}
    assert set(ready.cursor.requested) == set(run.studies)


def test_late_files_of_known_studies_are_no_burst() -> None:
    spool = Spool()
    spool.copy("1.2.1")
    spool.copy("1.2.2")
    ready = tick(spool, tick(spool, ArrivalCursor(), 0).cursor, QUIET_S + 1, partitions={"1.2.1", "1.2.2"})
    assert kinds(ready) == [(RunKind.STUDY, ("1.2.1",)), (RunKind.STUDY, ("1.2.2",))]
    assert ready.new_partitions == [] and dict(ready.cursor.bursts) == {}


def test_a_burst_is_cut_into_runs_of_at_most_studies_per_run() -> None:
    spool = Spool()
    uids = [f"1.2.{i:02d}" for i in range(11)]
    for uid in uids:
        spool.copy(uid, count=1)
    rules = ArrivalRules(quiet_period_s=QUIET_S, early_start=False, studies_per_run=5)
    ready = tick(spool, tick(spool, ArrivalCursor(), 0, rules).cursor, QUIET_S + 1, rules)
    # 5 + 5 + 1: the last one alone is a study's own run.
    assert kinds(ready) == [(RunKind.BURST, tuple(uids[:5])), (RunKind.BURST, tuple(uids[5:10])),
                            (RunKind.STUDY, (uids[10],))]
    assert ready.new_partitions == uids


def test_a_burst_that_failed_for_good_is_split_once() -> None:
    spool = Spool()
    spool.copy("1.2.1")
    spool.copy("1.2.2")
    ready = tick(spool, tick(spool, ArrivalCursor(), 0).cursor, QUIET_S + 1)
    [burst] = ready.runs
    known = {"1.2.1", "1.2.2"}
    # Still running (or not launched yet): kept.
    running = tick(spool, ready.cursor, QUIET_S + 2, partitions=known, runs={burst.tag: RunOutcome.PENDING})
    assert running.runs == [] and burst.tag in running.cursor.bursts
    split = tick(spool, running.cursor, QUIET_S + 3, partitions=known, runs={burst.tag: RunOutcome.FAILED})
    assert kinds(split) == [(RunKind.AFTER_BURST, ("1.2.1",)), (RunKind.AFTER_BURST, ("1.2.2",))]
    assert [r.run_key for r in split.runs] == [f"1.2.1:after-burst:{burst.tag}", f"1.2.2:after-burst:{burst.tag}"]
    assert all(r.files and set(r.files) <= set(burst.files) for r in split.runs)
    assert dict(split.failed_bursts) == {burst.tag: ("1.2.1", "1.2.2")} and split.new_partitions == []
    assert dict(split.cursor.bursts) == {}
    assert tick(spool, split.cursor, QUIET_S + 4, partitions=known, runs={burst.tag: RunOutcome.FAILED}).runs == []


def test_a_burst_that_succeeded_is_forgotten() -> None:
    spool = Spool()
    spool.copy("1.2.1")
    spool.copy("1.2.2")
    ready = tick(spool, tick(spool, ArrivalCursor(), 0).cursor, QUIET_S + 1)
    [burst] = ready.runs
    done = tick(spool, ready.cursor, QUIET_S + 2, runs={burst.tag: RunOutcome.SUCCEEDED})
    assert done.runs == [] and dict(done.cursor.bursts) == {} and dict(done.failed_bursts) == {}


def test_a_ready_study_waits_briefly_for_one_about_to_settle() -> None:
    spool = Spool()
    spool.copy("1.2.1")
    first = tick(spool, ArrivalCursor(), 0)
    spool.copy("1.2.2")
    second = tick(spool, first.cursor, 2)  # first seen 2 s later
    # 1.2.1 settled 0.5 s ago; 1.2.2 settles in 1.5 s (beyond BURST_JOIN_S, within BURST_WINDOW_S).
    assert BURST_JOIN_S < 1.5 <= BURST_WINDOW_S
    waiting = tick(spool, second.cursor, QUIET_S + 0.5)
    assert waiting.runs == [] and waiting.skip_reason == "waiting for 1 stud(ies) to settle"
    together = tick(spool, waiting.cursor, QUIET_S + 2.5)
    assert kinds(together) == [(RunKind.BURST, ("1.2.1", "1.2.2"))]


def test_a_study_ready_long_enough_waits_no_more() -> None:
    spool = Spool()
    spool.copy("1.2.1")
    first = tick(spool, ArrivalCursor(), 0)
    spool.copy("1.2.2")
    second = tick(spool, first.cursor, 6)
    # 1.2.1 settled more than BURST_WINDOW_S ago, 1.2.2 settles in 2 s: 1.2.1 goes alone.
    alone = tick(spool, second.cursor, QUIET_S + BURST_WINDOW_S + 1)
    assert kinds(alone) == [(RunKind.STUDY, ("1.2.1",))]


def test_a_study_settling_within_burst_join_s_joins_in_the_same_tick() -> None:
    spool = Spool()
    spool.copy("1.2.1")
    first = tick(spool, ArrivalCursor(), 0)
    spool.copy("1.2.2")
    second = tick(spool, first.cursor, BURST_JOIN_S / 2)
    joined = tick(spool, second.cursor, QUIET_S + 0.1)  # 1.2.2 settles in BURST_JOIN_S / 2 - 0.1
    assert kinds(joined) == [(RunKind.BURST, ("1.2.1", "1.2.2"))]


def test_unreadable_files_are_quarantined_once() -> None:
    spool = Spool()
    broken = spool.copy(UNREADABLE, count=1, name="broken")
    ready = tick(spool, tick(spool, ArrivalCursor(), 0).cursor, QUIET_S + 1)
    [run] = ready.runs
    assert (run.kind, run.studies, run.files) == (RunKind.QUARANTINE, (), tuple(broken))
    assert run.run_key.startswith("quarantine:") and ready.new_partitions == []
    assert tick(spool, ready.cursor, QUIET_S + 2).runs == []


def test_new_studies_get_one_early_run_as_they_arrive() -> None:
    spool = Spool()
    empty = tick(spool, ArrivalCursor(), 0, EARLY)
    spool.copy("1.2.2")
    spool.copy("1.2.1")
    first = tick(spool, empty.cursor, 1, EARLY)
    [run] = first.runs
    assert (run.kind, run.studies, run.files) == (RunKind.EARLY, ("1.2.1", "1.2.2"), ())
    assert run.run_key == f"early:{run.tag}" and run.await_quiet_s == QUIET_S and run.arrived_after_ns == T0
    assert first.new_partitions == ["1.2.1", "1.2.2"] and dict(first.cursor.early) == {run.tag: run.studies}
    known = {"1.2.1", "1.2.2"}
    # Settled while the run is under way: nothing more.
    during = tick(spool, first.cursor, QUIET_S + 2, EARLY, partitions=known)
    assert during.runs == [] and during.skip_reason == "2 stud(ies) in runs started as they arrived"
    # The run ended and ingested; a late file of a known study goes the quiet-period way.
    spool.remove("1.2.1")
    spool.remove("1.2.2")
    done = {run.tag: RunOutcome.SUCCEEDED}
    after = tick(spool, during.cursor, QUIET_S + 3, EARLY, partitions=known, runs=done)
    assert after.runs == [] and dict(after.cursor.early) == {}
    late = spool.copy("1.2.1", count=1)
    settling = tick(spool, after.cursor, QUIET_S + 4, EARLY, partitions=known)
    assert settling.runs == [] and settling.new_partitions == []
    [again] = tick(spool, settling.cursor, 2 * QUIET_S + 5, EARLY, partitions=known).runs
    assert (again.kind, again.studies, again.files) == (RunKind.STUDY, ("1.2.1",), tuple(late))


def test_an_early_run_that_left_files_behind_hands_them_to_the_quiet_period_path() -> None:
    spool = Spool()
    files = spool.copy("1.2.1")
    first = tick(spool, ArrivalCursor(), 0, EARLY)
    [run] = first.runs
    assert run.arrived_after_ns == 0  # no scan before: counts from first sight
    failed = tick(spool, first.cursor, QUIET_S + 1, EARLY, partitions={"1.2.1"}, runs={run.tag: RunOutcome.FAILED})
    [again] = failed.runs
    assert (again.kind, again.files) == (RunKind.STUDY, tuple(files))


def test_the_cursor_forgets_what_left_the_spool() -> None:
    spool = Spool()
    spool.copy("1.2.1")
    ready = tick(spool, tick(spool, ArrivalCursor(), 0).cursor, QUIET_S + 1)
    assert set(ready.cursor.requested) == {"1.2.1"} and len(ready.cursor.files) == 2
    spool.remove("1.2.1")
    gone = tick(spool, ready.cursor, QUIET_S + 2, partitions={"1.2.1"})
    assert dict(gone.cursor.requested) == {} and dict(gone.cursor.files) == {}
    assert gone.cursor.scanned_ns == T0 + int((QUIET_S + 2) * S)


def test_a_stored_cursor_keeps_loading() -> None:
    """The sensor's cursor as running instances have stored it: the same JSON, the same keys."""
    stored = {"files": {"/spool/a/0.dcm": [1000, 5, "1.2.1", 7]}, "requested": {"1.2.1": "0123456789abcdef"},
              "bursts": {"b1": ["1.2.1", "1.2.2"]}, "early": {"e1": ["1.2.3"]}, "scanned_ns": 7}
    cursor = ArrivalCursor.from_json(json.dumps(stored))
    assert cursor.files == {"/spool/a/0.dcm": (1000, 5, "1.2.1", 7)} and cursor.bursts == {"b1": ("1.2.1", "1.2.2")}
    assert cursor.early == {"e1": ("1.2.3",)} and cursor.scanned_ns == 7
    assert cursor.to_json() == json.dumps(stored)
    # Older cursors had neither early runs nor the scan time; none is empty.
    old = ArrivalCursor.from_json(json.dumps({"files": {}, "requested": {}, "bursts": {}}))
    assert old == ArrivalCursor() == ArrivalCursor.from_json(None)
