"""Arrival → SEG under the real daemon, against the same work done in one process, same run.

    python bench/arrival.py [--burst 10] [--code PATH] [--keep-mtimes]

Prepares a site as the demo does (annotated studies ingested, a `tiny` nnU-Net trained,
registered and promoted in the site's MLflow store), then starts `dagster dev` on it (webserver,
daemon and code server as one process group, the instance made from the repository's
dagster.yaml: queued runs, the default run launcher, the real sensors and automation). It
writes N new CT studies into the spool as a receiver does (new files, new mtimes; `--keep-mtimes`:
as `cp -p` does) — one study, then a burst of `--burst` — and times,
from the end of the copy, the appearance of each study's row in the `segmentations` Delta
table. Before the daemon starts, the same studies are ingested and segmented in one warm
process with the same model (the work alone: ingest_files + production_model + segment_study,
model load included once). Prints both, and the goal: last SEG ≤ quiet period + 1.3 × work.
The site's model cache holds the production version, as on any site after its first
segmentation (`--cold-model-cache`: empty, the first run downloads it from MLflow).

`--code PATH` runs the daemon on another checkout of the repository (e.g. `git archive HEAD`
unpacked somewhere) with this venv: the "before" of a change, measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.training_site import TRAIN_COHORT, TRAIN_GRID  # noqa: E402  (after the sys.path line above)

NEW_GRID = {"matrix": 48}  # the scanner's 48 slices at 48²: the "48² CT studies"
QUIET_S = 10.0  # ArchiveResource's default quiet period, which the daemon uses


def prepare_site(root: Path) -> Path:
    """KAAPANA_HOME with six annotated studies, a tiny model trained and promoted (as the
    demo's site has after step 3). Returns the home."""
    import dagster as dg

    from kaapana_assets.archive.service import Archive
    from kaapana_assets.cohorts.assets import cohorts
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.ingest.pipeline import ingest_files
    from kaapana_assets.synthetic import generate_site
    from kaapana_assets.training.assets import nnunet_dataset, trained_model
    from kaapana_assets.training.assets import production_model as promote
    from resources import site_resources

    home = KaapanaHome(root / "kaapana").ensure()
    train = generate_site("site-a", 6, seed=21, out=root / "train", with_annotations=True, **TRAIN_GRID)  # type: ignore[arg-type]
    ingest_files([f for s in train for f in s.files], Archive.for_home(home), remove_sources=False)
    (root / "cohorts").mkdir(exist_ok=True)
    (root / "cohorts" / "liver-train.yaml").write_text(TRAIN_COHORT)
    resources = site_resources(home.root, root / "cohorts", device="cpu", schedule="tiny", promotion_dice=0.0)
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("cohorts", ["liver-train"])
        result = dg.materialize([cohorts, nnunet_dataset, trained_model, promote], partition_key="liver-train",
                                instance=instance, resources=resources, run_config=quiet)
        if not result.success:
            raise RuntimeError("training the bench's model failed")
    return home.root


def new_studies(out: Path, count: int, first_index: int) -> list[tuple[str, Path]]:
    """(study_uid, folder of its files) for `count` new unannotated CT studies."""
    from kaapana_assets.synthetic import generate_site

    studies = generate_site("site-a", count, seed=77, out=out, first_index=first_index, **NEW_GRID)  # type: ignore[arg-type]
    return [(s.study_uid, s.ct_files[0].parent) for s in studies]


def daemon_environment(home: Path, dagster_home: Path, code: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAAPANA_", "DAGSTER_"))}
    env.update({
        "KAAPANA_HOME": str(home), "DAGSTER_HOME": str(dagster_home), "DAGSTER_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    })
    return env


@contextmanager
def running_daemon(home: Path, dagster_home: Path, code: Path, log: Path) -> Iterator[subprocess.Popen]:
    """`dagster dev` on the site, in its own process group, ready (daemon heartbeats and a
    first sensor tick) when this yields; the whole group is stopped on exit."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    from kaapana_assets.federation.local import free_port

    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copy(code / "dagster.yaml", dagster_home / "dagster.yaml")
    env = daemon_environment(home, dagster_home, code)
    # The instance's SQLite storages are created (and their schema stamped) here, before
    # `dagster dev` starts: two processes creating them at once can leave two alembic heads.
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as instance:
        with log.open("w") as out:
            process = subprocess.Popen(
                [str(Path(sys.executable).parent / "dagster"), "dev", "-m", "definitions", "-h", "127.0.0.1",
                 "-p", str(free_port())],
                cwd=code, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not _ticked(instance, "incoming_studies"):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dagster dev did not come up; see {log}")
                time.sleep(0.5)
        except BaseException:
            _stop_group(process)
            raise
    try:
        yield process
    finally:
        _stop_group(process)


def _ticked(instance: object, sensor_name: str) -> bool:
    """The sensor has finished a tick: it has scanned the spool once (a tick still in
    progress may not have, and the first scan of all counts every file from that scan)."""
    from dagster._core.scheduler.instigation import InstigatorType, TickStatus

    states = instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)  # type: ignore[attr-defined]
    for state in states:
        if state.name == sensor_name and any(tick.status != TickStatus.STARTED for tick in instance.get_ticks(  # type: ignore[attr-defined]
                state.instigator_origin_id, state.selector_id, limit=2)):
            return True
    return False


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to our own process group (dagster dev stops its children), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def drop(studies: list[tuple[str, Path]], spool: Path, name: str, keep_mtimes: bool = False) -> tuple[float, float]:
    """Write the studies' files into the spool as a receiver (or `cp`) does: new files, new
    mtimes; `keep_mtimes`: as `cp -p` or `rsync -a` do (old mtimes: the sensor must count from
    first sight). The clock starts when the last file is written. Returns (that moment, the
    copy's seconds)."""
    target = spool / name
    started = time.monotonic()
    for study_uid, folder in studies:
        shutil.copytree(folder, target / study_uid[-12:], copy_function=shutil.copy2 if keep_mtimes else shutil.copy)
    return time.monotonic(), time.monotonic() - started


def wait_for_segs(lake_path: Path, study_uids: list[str], since: float, timeout_s: float) -> dict[str, float]:
    """Seconds from `since` until each study's row shows in the segmentations table."""
    from kaapana_assets.lake import Lake
    from kaapana_assets.lake.schemas import SEGMENTATIONS

    lake = Lake(lake_path)
    seen: dict[str, float] = {}
    deadline = since + timeout_s
    while len(seen) < len(study_uids) and time.monotonic() < deadline:
        if lake.exists(SEGMENTATIONS):
            done = set(lake.read(SEGMENTATIONS)["study_uid"].to_list())
            now = time.monotonic() - since
            for study_uid in study_uids:
                if study_uid in done and study_uid not in seen:
                    seen[study_uid] = now
        time.sleep(0.2)
    return seen


@dataclass
class RunTimes:
    job: str
    partition: str
    status: str
    queued_s: float  # run created (the sensor's tick submitted it), from the copy
    started_s: float  # the run's process started
    first_step_s: float  # its first step started (after imports and run set-up)
    ended_s: float


def run_times(dagster_home: Path, wall_start: float, wall_zero: float) -> list[RunTimes]:
    """The runs created after `wall_start`, timed from `wall_zero` (time.time() at the copy's end)."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    rows = []
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as instance:
        for record in instance.get_run_records(dg.RunsFilter(created_after=None)):
            run = record.dagster_run
            if record.create_timestamp.timestamp() < wall_start:
                continue
            steps = instance.get_records_for_run(
                run.run_id, of_type=dg.DagsterEventType.STEP_START, limit=1).records
            first = steps[0].event_log_entry.timestamp if steps else float("nan")
            rows.append(RunTimes(
                run.job_name, run.tags.get("dagster/partition", ""), run.status.value,
                record.create_timestamp.timestamp() - wall_zero,
                (record.start_time or float("nan")) - wall_zero, first - wall_zero,
                (record.end_time or float("nan")) - wall_zero))
    return sorted(rows, key=lambda r: r.queued_s)


WORK_SCRIPT = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
# Imports are not the work (a warm process has them): torch, nnU-Net's predictor, MLflow.
import mlflow, torch, nnunetv2.inference.predict_from_raw_data  # noqa
from kaapana_assets.environment import Environment
from kaapana_assets.home import KaapanaHome
from kaapana_assets.archive.service import Archive
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.segmentation.models import production_model
from kaapana_assets.segmentation.segment import segment_study
from kaapana_assets.training.tracking import default_tracking
home = KaapanaHome(Path(sys.argv[2]))
targets = Archive.for_home(home)
tracking = default_tracking(Environment.read(home=home.root))
tracking.client()  # the store opened, as a running code location has it
t0 = time.perf_counter()
model = production_model(tracking, "nnunet-liver-train", home.root / "models-work", "cpu")
load = time.perf_counter() - t0
ingest = segment = 0.0
for study_uid, folder in json.loads(sys.argv[3]):
    t1 = time.perf_counter()
    ingest_files(sorted(Path(folder).iterdir()), targets, remove_sources=False)
    t2 = time.perf_counter()
    segment_study(targets, study_uid, model)
    segment += time.perf_counter() - t2
    ingest += t2 - t1
print(json.dumps({"load_s": load, "ingest_s": ingest, "segment_s": segment}))
"""


def work_alone(home: Path, studies: list[tuple[str, str]]) -> dict[str, float]:
    """The same studies ingested and segmented in one fresh process, every import done before
    the clock starts: the model's download and load (once) and each study's ingest and
    segmentation are timed. Returns {load_s, ingest_s, segment_s}."""
    env = daemon_environment(home, home / "dagster-unused", REPO)
    done = subprocess.run([sys.executable, "-c", WORK_SCRIPT, str(REPO), str(home), json.dumps(studies)],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the in-process work failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--code", type=Path, default=REPO, help="repository checkout the daemon runs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary homes and logs")
    parser.add_argument("--keep-mtimes", action="store_true",
                        help="copy as `cp -p` does (old mtimes) instead of writing new files as a receiver does")
    parser.add_argument("--cold-model-cache", action="store_true",
                        help="leave the site's model cache empty: the first run downloads the model from MLflow")
    parser.add_argument("--site", type=Path, help="a prepared KAAPANA_HOME to copy instead of training one "
                        "(e.g. <kept folder>/work before the work ran: any home with the model promoted)")
    args = parser.parse_args()
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    root = Path(tempfile.mkdtemp(prefix="bench-arrival-"))
    try:
        t0 = time.perf_counter()
        if args.site:
            home = root / "kaapana"
            shutil.copytree(args.site, home, ignore=shutil.ignore_patterns("incoming", "models-work"))
        else:
            log = root / "training.log"
            with log.open("w") as out, redirect_stdout(out), redirect_stderr(out):  # nnU-Net prints every epoch
                home = prepare_site(root)
            shutil.copytree(home, root / "prepared")  # what --site can reuse
        print(f"site prepared (6 annotated studies, tiny model promoted) in {time.perf_counter() - t0:.0f} s")
        groups = {"1": new_studies(root / "new-1", 1, 600), str(args.burst): new_studies(root / "new-n", args.burst, 700)}

        # The work alone, on a copy of the site per group (its lake must not know the new studies).
        work = {}
        for n, studies in groups.items():
            work_home = root / f"work-{n}"
            shutil.copytree(home, work_home)
            work[n] = work_alone(work_home, [(uid, str(f)) for uid, f in studies])
        if not args.cold_model_cache:
            # As on any site after its first segmentation: the production version is in the
            # site's model cache (the first run after a promotion downloads it once).
            shutil.copytree(root / "work-1" / "models-work", home / "models")

        dagster_home = root / "dagster"
        log = root / "dagster-dev.log"
        results: dict[str, dict[str, float]] = {}
        runs: dict[str, list[RunTimes]] = {}
        with running_daemon(home, dagster_home, args.code.resolve(), log):
            for n, studies in groups.items():
                wall_start = time.time()
                since, copy_s = drop(studies, home / "incoming", f"arrival-{n}", args.keep_mtimes)
                wall_zero = time.time()
                seen = wait_for_segs(home / "lake", [uid for uid, _ in studies], since, timeout_s=900)
                missing = len(studies) - len(seen)
                results[n] = {"first": min(seen.values(), default=float("nan")),
                              "last": max(seen.values(), default=float("nan")) if not missing else float("nan"),
                              "missing": missing, "copy_s": copy_s}
                time.sleep(2)  # let the runs' ends be recorded
                runs[n] = run_times(dagster_home, wall_start, wall_zero)
        _report(results, work, runs, args.code.resolve())
        return 0 if all(r["missing"] == 0 for r in results.values()) else 1
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _report(results: dict[str, dict[str, float]], work: dict[str, dict[str, float]],
            runs: dict[str, list[RunTimes]], code: Path) -> None:
    print(f"\ndaemon code: {code}; quiet period {QUIET_S:.0f} s; times from the end of the copy")
    for n, r in results.items():
        print(f"\nN = {n} (copied in {r['copy_s']:.2f} s): runs, s from the copy's end: "
              "queued → process started → first step → ended")
        for run in runs[n]:
            print(f"  {run.job:<22} {run.partition[-12:]:>12} {run.status:<8} {run.queued_s:6.1f} → "
                  f"{run.started_s:6.1f} → {run.first_step_s:6.1f} → {run.ended_s:6.1f}")
    print(f"\n{'N':>3} {'work alone':>11} {'(model load)':>13} {'first SEG':>10} {'last SEG':>9} "
          f"{'goal':>6} {'last/work':>10} {'(last-quiet)/work':>18}")
    for n, r in results.items():
        w = work[n]
        total = w["load_s"] + w["ingest_s"] + w["segment_s"]
        goal = QUIET_S + 1.3 * total
        missing = f"  ({int(r['missing'])} SEG(s) missing)" if r["missing"] else ""
        print(f"{n:>3} {total:>10.1f}s {w['load_s']:>12.1f}s {r['first']:>9.1f}s {r['last']:>8.1f}s "
              f"{goal:>5.1f}s {r['last'] / total:>10.2f} {(r['last'] - QUIET_S) / total:>18.2f}{missing}")
    print("goal: last SEG ≤ quiet period + 1.3 × work alone, i.e. (last-quiet)/work ≤ 1.3")


if __name__ == "__main__":
    raise SystemExit(main())
