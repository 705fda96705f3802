"""What the federation costs: one federated round vs the same local training done directly.

    python bench/federated_overhead.py [--sites 2] [--train 6] [--schedule short]
                                       [--local-epochs 6] [--iterations 50] [--work DIR]

`--sites` synthetic sites (scanner profiles site-a, site-b, …), each with `--train` annotated
studies in its own KAAPANA_HOME, the liver-train cohort snapshotted (as in the test suite).
  - federated: a LocalFederation (Flower SuperLink + one SuperNode per site, on loopback);
    federated_plan[overhead] once (not timed), then ONE federated_rounds[overhead|1]
    materialization is timed: one Flower run — the sites train from global 0 (their ClientApps
    materialize site_update into each site's own Dagster instance), the hub aggregates,
    the sites score global 1 (site_evaluation).
  - direct: the same site functions called in this process, no Flower, no Dagster:
    train_update(ctx, experiment, 1), then evaluate_global on the weights it produced, on the
    same sites, the same data, the same plans, the same initial weights and schedule (a fresh
    experiment copy per mode, so the sites preprocess again, as round 1 does in the federation).
      sequential: one site after the other, torch threads = all cores;
      parallel:   one process per site (multiprocessing, spawn; timed from a barrier after
                  their imports), torch threads = cores / sites — what the SuperNodes get.
Goal (the issue): the federation adds ≤ 10 % wall time, i.e. federated / direct ≤ 1.10.

Where the federated round's time goes comes from timestamps: the hub's and each site's
Dagster event logs, and the Flower logs (SuperLink, SuperNodes) tailed while the round runs.
Run it on an otherwise idle machine: other processes on the same cores distort every wall
time (the share of the machine they took during each timed run is printed; the CPU-time
ratio is the number that survives a busy machine best).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXPERIMENT = "overhead"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# -- the direct reference (plain functions: also the body of the parallel workers) ------------

@dataclass
class DirectTiming:
    site: str
    train_s: float
    evaluate_s: float
    start: float  # time.time()
    end: float
    cpu_s: float = 0.0  # CPU seconds of this process (and its reaped children) meanwhile


@dataclass
class Totals:
    """One timed run: wall time, CPU time of every process it used, and the CPU time every
    other process on the machine used meanwhile (which inflates the wall time)."""

    wall_s: float
    cpu_s: float
    others_s: float

    def others_share(self, cores: int) -> float:
        return max(0.0, self.others_s) / (self.wall_s * cores)


def machine_cpu() -> float:
    """CPU seconds all processes on this machine have used (/proc/stat: every state but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """CPU seconds of this process and its waited-for children."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def tree_cpu(roots: list[int]) -> float:
    """CPU seconds of process trees (Linux /proc): each live or zombie process's own time
    plus that of the children it has reaped, so nothing counts twice."""
    from kaapana_assets.federation.local import descendants

    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in {p for root in roots for p in (root, *descendants(root))}:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / tick


def _site_context(site: str, home: Path, device: str, threads: int, log: Callable[[str], None]) -> Any:
    from kaapana_assets.federated.site import SiteContext
    from kaapana_assets.federation.store import FederationStore
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.lake import Lake

    kh = KaapanaHome(home)
    # The same folders site_resources gives the site's ClientApp (lake, archive, nnunet work).
    return SiteContext(site=site, store=FederationStore(kh.site_federation), lake=Lake(kh.lake),
                       archive_root=kh.archive, work_root=home / "nnunet", device=device, threads=threads, log=log)


def warm_imports() -> None:
    """What a long-running site process has loaded anyway: imported before the direct
    timings. The site's SuperExec (kaapana-superexec) holds the same list imported and
    forks each ClientApp from it."""
    from kaapana_assets.federation.warm_superexec import site_stack
    from kaapana_assets.preload import preload

    failed = preload(site_stack())
    assert not failed, f"could not import {failed}"


def direct_round(ctx: Any, experiment: str, default_threads: int) -> DirectTiming:
    """Round 1 at one site without Flower or Dagster: train from global 0, then score the
    result (the federation scores the aggregate: same network, same cost)."""
    import torch

    from kaapana_assets.federated.site import evaluate_global, train_update
    from kaapana_assets.federation.payload import unpack_update

    start, cpu = time.time(), own_cpu()
    train_update(ctx, experiment, 1)
    update = unpack_update(ctx.site, ctx.store.read_message(experiment, 1, "update", ctx.site))
    ctx.store.write_global(experiment, 1, update.weights)
    trained = time.time()
    # A site's evaluation runs in a fresh ClientApp process, with torch's default threads.
    torch.set_num_threads(default_threads)
    evaluate_global(ctx, experiment, 1)
    end = time.time()
    return DirectTiming(ctx.site, trained - start, end - trained, start, end, own_cpu() - cpu)


def _parallel_worker(site: str, home: str, experiment: str, device: str, threads: int, log_path: str,
                     barrier: Any, results: Any) -> None:
    """One site of the parallel direct reference, in its own process."""
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    import torch

    default_threads = torch.get_num_threads()
    warm_imports()  # before the barrier: not timed
    ctx = _site_context(site, Path(home), device, threads, lambda line: print(line, flush=True))
    barrier.wait()
    try:
        # Plain values: the parent cannot unpickle classes of this process's __mp_main__.
        results.put(("ok", dataclasses.asdict(direct_round(ctx, experiment, default_threads))))
    except BaseException as exc:  # reported to the parent, which fails with it
        results.put(("error", f"{site}: {type(exc).__name__}: {exc}"))
        raise


# -- timestamps of the federated round --------------------------------------------------------

class LogTail:
    """Tail every *.log in a folder from its current end, timestamping each new line."""

    def __init__(self, folder: Path, interval_s: float = 0.05):
        self.folder, self.interval_s = folder, interval_s
        self.lines: dict[str, list[tuple[float, str]]] = {}
        self._offsets = {p.name: p.stat().st_size for p in folder.glob("*.log")}
        self._partial: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self) -> None:
        now = time.time()
        for path in sorted(self.folder.glob("*.log")):
            offset = self._offsets.get(path.name, 0)
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
            if not data:
                continue
            self._offsets[path.name] = offset + len(data)
            text = self._partial.get(path.name, "") + data.decode(errors="replace")
            *complete, self._partial[path.name] = text.split("\n")
            self.lines.setdefault(path.name, []).extend((now, ANSI.sub("", line).strip()) for line in complete)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            time.sleep(self.interval_s)
        self._poll()

    def __enter__(self) -> LogTail:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def first(self, log: str, pattern: str, after: float = 0.0) -> float | None:
        for t, line in self.lines.get(log, []):
            if t >= after and pattern in line:
                return t
        return None

    def sequence(self, log: str, patterns: list[str]) -> list[float | None]:
        """Each pattern's first line after the previous pattern's line, in order."""
        found: list[float | None] = []
        lines = self.lines.get(log, [])
        i = 0
        for pattern in patterns:
            while i < len(lines) and pattern not in lines[i][1]:
                i += 1
            found.append(lines[i][0] if i < len(lines) else None)
            i += 1 if i < len(lines) else 0
        return found


@dataclass
class DagsterRunTimes:
    asset: str
    first: float  # the run's first event (created)
    step_start: float
    materialized: float  # the asset body returned
    end: float  # the run's last event


def run_times(instance: Any, run_id: str) -> DagsterRunTimes:
    events = instance.all_logs(run_id)
    assets = sorted({e.dagster_event.asset_key.to_user_string() for e in events
                     if e.dagster_event is not None and e.dagster_event.event_type_value == "ASSET_MATERIALIZATION"})
    asset = assets[0] if assets else "?"

    def at(kind: str) -> float:
        times = [e.timestamp for e in events if e.dagster_event is not None and e.dagster_event.event_type_value == kind]
        if not times:
            raise RuntimeError(f"run {run_id} ({asset}) has no {kind} event")
        return min(times)

    return DagsterRunTimes(asset, min(e.timestamp for e in events), at("STEP_START"), at("ASSET_MATERIALIZATION"),
                           max(e.timestamp for e in events))


def site_run_times(home: Path, since: float) -> dict[str, DagsterRunTimes]:
    """The site's own Dagster runs (the ClientApp's) that started after `since`, by asset."""
    import dagster as dg

    instance = dg.DagsterInstance.local_temp(str(home / "dagster"))
    try:
        found: dict[str, DagsterRunTimes] = {}
        for record in instance.get_run_records():
            times = run_times(instance, record.dagster_run.run_id)
            if times.first >= since:
                found[times.asset] = times
        return found
    finally:
        instance.dispose()


def mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.exists() else None


@dataclass
class SitePhase:
    """One site's part of one phase (train or evaluate) of the federated round."""

    received: float  # SuperNode: "Receiving: <kind> message"
    clientapp: float  # SuperExec: "Start `flwr-clientapp` process"
    stored: float  # the ClientApp verified the message and stored its weights (the file's mtime)
    run: DagsterRunTimes  # the site's Dagster run of the site asset
    sending: float  # SuperNode: "Sending: <kind> message" (the ClientApp's reply handed over)
    sent: float  # SuperNode: "Sent successfully"

    def segments(self) -> dict[str, float]:
        return {
            "SuperNode → SuperExec launches the ClientApp": self.clientapp - self.received,
            "ClientApp: pull the message from the SuperNode, verify + store": self.stored - self.clientapp,
            "ClientApp: open the site's Dagster instance, create the run": self.run.first - self.stored,
            "Dagster run start at the site": self.run.step_start - self.run.first,
            "site work (asset body)": self.run.materialized - self.run.step_start,
            "Dagster run end at the site": self.run.end - self.run.materialized,
            "ClientApp: read outbox, seal, identifier guard, exit": self.sending - self.run.end,
            "SuperNode pushes the reply to the SuperLink": self.sent - self.sending,
        }


@dataclass
class RoundTimeline:
    t0: float
    t1: float
    hub: DagsterRunTimes
    created_run: float | None  # SuperLink: "Created run" (flwr run's StartRun)
    serverapp: float | None  # SuperLink: "Started task" (the ServerApp process pulled its task)
    finished: float | None  # SuperLink: "Finished task"
    updates_pulled: float | None  # the hub stored the last site update (received/…/update)
    aggregated: float | None  # global 1 written at the hub
    evaluations_pulled: float | None  # the hub stored the last evaluation
    result: float | None  # the ServerApp wrote its result
    train: dict[str, SitePhase] = field(default_factory=dict)
    evaluate: dict[str, SitePhase] = field(default_factory=dict)

    def critical_path(self) -> list[tuple[str, float]]:
        """Contiguous segments from t0 to t1 through the slowest site of each phase (a mark
        the logs did not show merges its segment into the next)."""
        train = max(self.train.values(), key=lambda p: p.sent)
        evaluate = max(self.evaluate.values(), key=lambda p: p.sent)
        marks: list[tuple[str, float | None]] = [
            ("hub: Dagster run start (materialize → step)", self.hub.step_start),
            ("hub: `flwr run` CLI start → SuperLink creates the run", self.created_run),
            ("SuperLink launches the ServerApp process", self.serverapp),
            ("ServerApp: imports, nodes, seal + push weights; SuperNode polls", train.received),
        ]
        last = train.received
        for name, value in train.segments().items():
            last += value
            marks.append((f"train    · {name}", last))
        marks += [("hub: SuperLink relays, ServerApp pulls the updates", self.updates_pulled),
                  ("hub: verify, aggregate, write global 1", self.aggregated),
                  ("hub: seal + push evaluation; SuperNode polls", evaluate.received)]
        last = evaluate.received
        for name, value in evaluate.segments().items():
            last += value
            marks.append((f"evaluate · {name}", last))
        marks += [("hub: SuperLink relays, ServerApp pulls the evaluations", self.evaluations_pulled),
                  ("hub: ServerApp combines metrics, writes its result", self.result),
                  ("hub: ServerApp exits, SuperLink finishes the task", self.finished),
                  ("hub: `flwr run` exits; asset writes Delta rows + MLflow run", self.t1)]
        out, previous = [], self.t0
        for name, value in marks:
            if value is None:
                continue
            out.append((name, value - previous))
            previous = value
        return out


def site_phases(tail: LogTail, site: str, home: Path, runs: dict[str, DagsterRunTimes]) -> tuple[SitePhase, SitePhase]:
    from kaapana_assets.federation.store import FederationStore
    from kaapana_assets.home import KaapanaHome

    log = f"supernode-{site}.log"
    t = tail.sequence(log, ["Receiving: train message", "Start `flwr-clientapp` process", "Sending: train message",
                            "Sent successfully", "Receiving: evaluate message", "Start `flwr-clientapp` process",
                            "Sending: evaluate message", "Sent successfully"])
    store = FederationStore(KaapanaHome(home).site_federation)
    stored = [mtime(store.global_path(EXPERIMENT, 0)), mtime(store.global_path(EXPERIMENT, 1))]
    if any(v is None for v in [*t, *stored]) or "site_update" not in runs or "site_evaluation" not in runs:
        raise RuntimeError(f"incomplete timeline for {site}: {t}, stored {stored}, runs {sorted(runs)}")
    v: list[float] = [x for x in t if x is not None]
    w: list[float] = [x for x in stored if x is not None]
    return (SitePhase(v[0], v[1], w[0], runs["site_update"], v[2], v[3]),
            SitePhase(v[4], v[5], w[1], runs["site_evaluation"], v[6], v[7]))


def hub_marks(store: Any, sites: tuple[str, ...]) -> dict[str, float | None]:
    def last(kind: str) -> float | None:
        times = [mtime(store.message_path(EXPERIMENT, 1, kind, s, box="received")) for s in sites]
        return max(times) if all(t is not None for t in times) else None  # type: ignore[type-var]

    results = [mtime(p) for p in (store.experiment_dir(EXPERIMENT) / "results").glob("round-*.json")]
    return {"updates_pulled": last("update"), "aggregated": mtime(store.global_path(EXPERIMENT, 1)),
            "evaluations_pulled": last("evaluation"),
            "result": max((r for r in results if r is not None), default=None)}


# -- the benchmark ----------------------------------------------------------------------------

def say(*parts: object) -> None:
    print(*parts, file=sys.__stdout__, flush=True)


@contextlib.contextmanager
def quiet_stdout(path: Path) -> Iterator[TextIO]:
    """nnU-Net prints a lot: into the work folder, as the SuperNodes' output goes to theirs."""
    with open(path, "a", buffering=1) as f, contextlib.redirect_stdout(f):
        yield f


def copy_experiment(hub_store: Any, site_store: Any, source: str, target: str) -> None:
    """What the hub published for `source` (and round 0), as experiment `target` at a site."""
    for name in ("experiment", "plans", "fingerprint", "dataset"):
        data = hub_store.read_json(source, name)
        site_store.write_json(target, name, {**data, "experiment": target} if name == "experiment" else data)
    site_store.write_global(target, 0, hub_store.read_global(source, 0))


def main() -> int:
    cores = os.cpu_count() or 2
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--train", type=int, default=6, help="annotated studies per site")
    parser.add_argument("--schedule", default="short", choices=["tiny", "short", "full"])
    parser.add_argument("--local-epochs", type=int, default=None, help="default: the schedule's (short: 6)")
    parser.add_argument("--iterations", type=int, default=50, help="iterations per epoch (the presets: tiny 8, "
                        "short 10; 50 makes the site work, not the fixed costs, most of a round)")
    parser.add_argument("--width", type=int, default=None, help="base features; default: the schedule's")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per site; default: cores / sites")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--matrix", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default="", help="keep everything here (an empty or new folder); "
                        "default: a temporary folder")
    args = parser.parse_args()
    if args.sites < 1:
        parser.error("--sites must be at least 1")
    threads = args.threads or max(1, cores // args.sites)
    sites = tuple(f"site-{chr(ord('a') + i)}" for i in range(args.sites))

    if args.work:
        root = Path(args.work).resolve()
        if root.exists() and any(root.iterdir()):
            parser.error(f"--work {root} is not empty")
        root.mkdir(parents=True, exist_ok=True)
        return run(args, root, sites, threads, cores)
    with tempfile.TemporaryDirectory(prefix="federated-overhead-") as tmp:
        return run(args, Path(tmp), sites, threads, cores)


def run(args: argparse.Namespace, root: Path, sites: tuple[str, ...], threads: int, cores: int) -> int:
    import dagster as dg

    from kaapana_assets import nnunet
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.cohorts.definitions import CohortDefinition
    from kaapana_assets.cohorts.membership import snapshot_cohort
    from kaapana_assets.federated.assets import federated_plan, federated_rounds
    from kaapana_assets.federated.partitions import round_key
    from kaapana_assets.federated.site import compute_fingerprint
    from kaapana_assets.federation.keys import generate_site_key
    from kaapana_assets.federation.local import LocalFederation, LocalSite
    from kaapana_assets.federation.sites import SiteEntry, write_sites
    from kaapana_assets.federation.store import FederationStore
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.ingest.pipeline import ingest_files
    from kaapana_assets.lake import Lake
    from kaapana_assets.synthetic import generate_site
    from resources import site_resources
    from resources.federation import FederationResource

    # The liver-train cohort of the test suite's helpers (COHORT).
    cohort = CohortDefinition.model_validate({"name": "liver-train", "purpose": "train", "required_labels": ["liver"],
                                              "filter": {"modality": "CT", "has_reference_segmentation": True}})
    schedule = nnunet.Schedule.preset(args.schedule, epochs=args.local_epochs, iterations_per_epoch=args.iterations,
                                      base_features=args.width)
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    say(f"work folder {root}; {cores} cores, load average {os.getloadavg()[0]:.2f}")

    t = time.perf_counter()
    homes: dict[str, KaapanaHome] = {}
    keys: dict[str, str] = {}
    with quiet_stdout(logs / "setup.log"):
        for i, site in enumerate(sites):
            homes[site] = KaapanaHome(root / site).ensure()
            keys[site] = generate_site_key()
            studies = generate_site(site, args.train, seed=41 + i, out=root / "generated", with_annotations=True,
                                    slices=args.slices, matrix=args.matrix)
            ingest_files([f for s in studies for f in s.files], Archive.for_home(homes[site]),
                         remove_sources=False)
            snapshot_cohort(Lake(homes[site].lake), cohort)
    say(f"{len(sites)} sites × {args.train} studies generated and ingested ({time.perf_counter() - t:.0f}s)")

    hub = root / "hub"
    hub_store = FederationStore(KaapanaHome(hub).hub_federation)
    flower = LocalFederation(hub / "flower", [LocalSite(s, homes[s].root, keys[s], args.device, threads)
                                               for s in sites])
    try:
        t = time.perf_counter()
        flower.start()
        say(f"federation up: SuperLink {flower.connection.address}, {len(sites)} SuperNodes "
            f"({time.perf_counter() - t:.0f}s)")
        federation = FederationResource(
            superlink=flower.connection.address, root_certificate=str(flower.connection.root_certificate),
            federation_file=str(write_sites(hub / "federation.yaml", [SiteEntry(s, key=keys[s]) for s in sites])),
            folder=str(hub_store.root), rounds=1, min_sites=len(sites), schedule=args.schedule,
            local_epochs=schedule.epochs, iterations_per_epoch=schedule.iterations_per_epoch,
            base_features=schedule.base_features)
        resources = {**site_resources(hub, device=args.device, promotion_dice=0.0), "federation": federation}
        with dg.instance_for_test() as instance, quiet_stdout(logs / "hub.log"):
            instance.add_dynamic_partitions("federated_experiments", [EXPERIMENT])
            t = time.perf_counter()
            dg.materialize([federated_plan], partition_key=EXPERIMENT, instance=instance, resources=resources,
                           run_config=quiet)
            say(f"federated_plan[{EXPERIMENT}] ({time.perf_counter() - t:.0f}s, not timed)")

            flower_pids = [p.pid for p in (flower.superlink, *flower.supernodes.values(), *flower.superexecs.values())
                           if p is not None]
            with LogTail(hub / "flower" / "logs") as tail:
                cpu, machine = own_cpu() + tree_cpu(flower_pids), machine_cpu()
                t0 = time.time()
                result = dg.materialize([federated_plan, federated_rounds], partition_key=round_key(EXPERIMENT, 1),
                                        instance=instance, resources=resources, selection=[federated_rounds],
                                        run_config=quiet)
                t1 = time.time()
                cpu, machine = own_cpu() + tree_cpu(flower_pids) - cpu, machine_cpu() - machine
            hub_run = run_times(instance, result.run_id)
        federated = Totals(t1 - t0, cpu, machine - cpu)
        say(f"federated_rounds[{EXPERIMENT}|1]: {federated.wall_s:.1f}s (CPU {cpu:.0f}s; other processes "
            f"{federated.others_share(cores):.0%} of the machine)")
    finally:
        flower.close()

    timeline = RoundTimeline(t0, t1, hub_run, tail.first("superlink.log", "Created run"),
                             tail.first("superlink.log", "Started task"), tail.first("superlink.log", "Finished task"),
                             **hub_marks(hub_store, sites))
    for site in sites:
        timeline.train[site], timeline.evaluate[site] = site_phases(tail, site, homes[site].root,
                                                                    site_run_times(homes[site].root, t0))

    # The direct reference: a fresh copy of the experiment per mode, exported (not timed).
    modes = {"sequential": f"{EXPERIMENT}-direct-seq", "parallel": f"{EXPERIMENT}-direct-par"}
    with quiet_stdout(logs / "direct-prepare.log"):
        for experiment in modes.values():
            for site in sites:
                ctx = _site_context(site, homes[site].root, args.device, threads, print)
                copy_experiment(hub_store, ctx.store, EXPERIMENT, experiment)
                compute_fingerprint(ctx, experiment)

    import torch

    default_threads = torch.get_num_threads()
    warm_imports()
    sequential: dict[str, DirectTiming] = {}
    with quiet_stdout(logs / "direct-sequential.log"):
        machine, t = machine_cpu(), time.perf_counter()
        for site in sites:
            ctx = _site_context(site, homes[site].root, args.device, cores, print)
            sequential[site] = direct_round(ctx, modes["sequential"], default_threads)
        cpu = sum(d.cpu_s for d in sequential.values())
        seq = Totals(time.perf_counter() - t, cpu, machine_cpu() - machine - cpu)
    say(f"direct, sequential: {seq.wall_s:.1f}s (CPU {seq.cpu_s:.0f}s; other processes "
        f"{seq.others_share(cores):.0%} of the machine)")

    spawn = mp.get_context("spawn")
    barrier, queue = spawn.Barrier(len(sites) + 1), spawn.Queue()
    workers = [spawn.Process(target=_parallel_worker, name=f"direct-{site}",
                             args=(site, str(homes[site].root), modes["parallel"], args.device, threads,
                                   str(logs / f"direct-parallel-{site}.log"), barrier, queue)) for site in sites]
    for worker in workers:
        worker.start()
    parallel: dict[str, DirectTiming] = {}
    try:
        barrier.wait(timeout=600)
        machine, t = machine_cpu(), time.perf_counter()
        for _ in sites:
            status, value = queue.get(timeout=24 * 3600)
            if status != "ok":
                raise RuntimeError(f"direct parallel run failed: {value}")
            parallel[value["site"]] = DirectTiming(**value)
        cpu = sum(d.cpu_s for d in parallel.values())
        par = Totals(time.perf_counter() - t, cpu, machine_cpu() - machine - cpu)
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():  # only our own child, by its handle
                worker.terminate()
                worker.join()
    say(f"direct, parallel: {par.wall_s:.1f}s (CPU {par.cpu_s:.0f}s; other processes "
        f"{par.others_share(cores):.0%} of the machine)")
    if not args.work:
        shutil.rmtree(root / "generated", ignore_errors=True)

    report(args, sites, schedule, threads, cores, timeline, federated, sequential, seq, parallel, par)
    return 0


def report(args: argparse.Namespace, sites: tuple[str, ...], schedule: Any, threads: int, cores: int,
           timeline: RoundTimeline, federated: Totals, sequential: dict[str, DirectTiming], seq: Totals,
           parallel: dict[str, DirectTiming], par: Totals) -> None:
    federated_s = federated.wall_s
    say(f"\none round, {len(sites)} sites × {args.train} studies (grid {args.slices}×{args.matrix}²), schedule "
        f"{args.schedule}: {schedule.epochs} local epochs × {schedule.iterations_per_epoch} iterations, "
        f"width {schedule.base_features}, {args.device}; {cores} cores")
    width = 44
    header = (f"{'run':{width}s}{'wall':>9s}{'CPU':>8s}{'others':>8s}"
              + "".join(f"{s + ' train':>14s}{s + ' eval':>13s}" for s in sites))
    say(header)
    say("-" * len(header))

    def row(name: str, totals: Totals, cells: dict[str, tuple[float, float]]) -> None:
        say(f"{name:{width}s}{totals.wall_s:8.1f}s{totals.cpu_s:7.0f}s{totals.others_share(cores):8.0%}"
            + "".join(f"{cells[s][0]:13.1f}s{cells[s][1]:12.1f}s" for s in sites))

    row(f"federated round (Flower, {threads} thread(s)/site)", federated,
        {s: (timeline.train[s].run.materialized - timeline.train[s].run.step_start,
             timeline.evaluate[s].run.materialized - timeline.evaluate[s].run.step_start) for s in sites})
    row(f"direct, sequential ({cores} threads)", seq,
        {s: (sequential[s].train_s, sequential[s].evaluate_s) for s in sites})
    row(f"direct, parallel ({threads} thread(s)/site)", par,
        {s: (parallel[s].train_s, parallel[s].evaluate_s) for s in sites})
    say("(CPU: every process of the run — for the federation the hub's, the SuperLink's and the SuperNodes' "
        "with their ServerApp/ClientApp processes; others: CPU other processes on the machine took meanwhile, "
        "share of all cores — above a few % the wall times are inflated; site "
        "columns: the site work itself — in the federation the site assets' bodies, train_update and "
        "evaluate_global)")

    say("\nwhere the federated round's time goes (critical path: the slowest site of each phase)")
    path = timeline.critical_path()
    label = max(len(n) for n, _ in path) + 2
    for name, value in path:
        say(f"  {name:{label}s}{value:8.1f}s")
    work = sum(v for n, v in path if "site work" in n)
    say(f"  {'sum':{label}s}{sum(v for _, v in path):8.1f}s  (wall {federated_s:.1f}s)")
    say(f"  {'of which site work (asset bodies)':{label}s}{work:8.1f}s;  everything else "
        f"{federated_s - work:.1f}s ({(federated_s - work) / federated_s:.0%})")
    slowest = max(sites, key=lambda s: parallel[s].end - parallel[s].start)
    direct_work = parallel[slowest].train_s + parallel[slowest].evaluate_s
    say(f"  {'direct, parallel: the slowest site, train + evaluate':{label}s}{direct_work:8.1f}s;  site work in "
        f"the federation {work - direct_work:+.1f}s (contention with Flower's processes, and the training's "
        f"own run-to-run variance)")
    fixed = federated_s - work
    say(f"  the federation's cost beyond the site work is {fixed:.0f}s per round here: it adds ≤ 10 % once a "
        f"round's site work is ≥ {10 * fixed:.0f}s")

    say("\nper site (seconds from the start of the materialization)")
    marks: list[tuple[str, Callable[[SitePhase], float]]] = [
        ("train message received", lambda p: p.received), ("ClientApp launched", lambda p: p.clientapp),
        ("message verified + stored", lambda p: p.stored), ("site Dagster run created", lambda p: p.run.first),
        ("site asset body starts", lambda p: p.run.step_start), ("site asset body done", lambda p: p.run.materialized),
        ("site Dagster run done", lambda p: p.run.end), ("reply handed to SuperNode", lambda p: p.sending),
        ("reply sent", lambda p: p.sent)]
    say(f"  {'event':34s}" + "".join(f"{s:>12s}" for s in sites))
    for phase_name, phases in (("train", timeline.train), ("evaluate", timeline.evaluate)):
        for name, mark in marks:
            event = f"{phase_name[:5]} · " + name.replace("train message", f"{phase_name} message")
            say(f"  {event:34s}" + "".join(f"{mark(phases[s]) - timeline.t0:12.1f}"
                                                                     for s in sites))
    hub = timeline.hub
    hub_events = [("hub Dagster step starts", hub.step_start), ("SuperLink: Flower run created", timeline.created_run),
                  ("SuperLink: ServerApp task started", timeline.serverapp),
                  ("hub: last update pulled", timeline.updates_pulled), ("hub: global 1 written", timeline.aggregated),
                  ("hub: last evaluation pulled", timeline.evaluations_pulled),
                  ("hub: ServerApp result written", timeline.result),
                  ("SuperLink: ServerApp task finished", timeline.finished), ("hub Dagster run done", hub.end)]
    for name, value in hub_events:
        say(f"  {name:34s}" + (f"{value - timeline.t0:12.1f}" if value is not None else f"{'?':>12s}"))

    say("")
    say(f"federated / direct (sequential): {federated_s / seq.wall_s:.2f}")
    say(f"federated / direct (parallel): {federated_s / par.wall_s:.2f}   (goal ≤ 1.10)")
    say(f"CPU time, federated / direct (parallel): {federated.cpu_s / par.cpu_s:.2f}   "
        "(less sensitive to other load on the machine than wall time)")


if __name__ == "__main__":
    sys.exit(main())
