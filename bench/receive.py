"""DICOM receive throughput: dcmtk's storescu (TCP_NODELAY=1) sends the same synthetic
corpus to `kaapana receive` and to Orthanc, all on one private loopback, over 1, 2 and 4
parallel associations (one storescu process each, the corpus split between them).

    sudo python bench/receive.py [--instances 1000] [--parallel 1 2 4] [--code DIR]

Orthanc listens on every interface, so the benchmark re-executes itself inside
`unshare -n` (root): a network namespace whose only interface is its own loopback.
A third server, the *floor*, is pynetdicom alone: the receiver's AE, settings and
event-driven reactors, with a C-STORE handler that acknowledges every data set unread and
stores nothing — the most any receiver built on pynetdicom can do on this machine.
Prints total instances/s for all three and the ratios to Orthanc (goal ≥ 1.5× Orthanc), and
the CPU time each server process spent per instance (user + system, all threads; steadier than the wall
clock on a shared machine). Both run in the same process, one after the other, per
parallelism: compare the ratios, not the absolute figures, on a loaded machine. `--code DIR` runs `kaapana receive` from another checkout
(e.g. `git archive` of an earlier commit) for a before/after comparison on the same data.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def storescu(port: int, aec: str, files: list[Path], parallel: int = 1) -> float:
    """Seconds for `parallel` storescu processes (one association each) to send `files`."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    shares = [files[i::parallel] for i in range(parallel)]
    os.sync()  # the other side's files written back first: neither pays for the other's writeback
    t0 = time.perf_counter()
    # One association per process for its whole share, as modalities sending batches would.
    procs = [subprocess.Popen(["storescu", "-R", "-aet", f"BENCH{i}", "-aec", aec, "127.0.0.1", str(port),
                               *map(str, share)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i, share in enumerate(shares)]
    failed = [p.communicate(timeout=1800)[1] for p in procs if p.wait(timeout=1800) != 0]
    elapsed = time.perf_counter() - t0
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0][-2000:]!r}")
    return elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process and of its running child processes (the
    workers of `kaapana receive`; Linux /proc): less disturbed by other load on a shared
    machine than the wall clock."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            own, fields = stat.parent.name, stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if own == str(pid) or fields[1] == str(pid):  # the process, or its child (ppid)
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


class Sent(NamedTuple):
    seconds: float  # wall clock, from the first storescu start to the last one's end
    cpu: float  # the server process's CPU seconds meanwhile


def send(server_pid: int, port: int, aec: str, files: list[Path], parallel: int) -> Sent:
    """`storescu` to a running server, with that server's CPU time meanwhile."""
    cpu = cpu_seconds(server_pid)
    seconds = storescu(port, aec, files, parallel)
    return Sent(seconds, cpu_seconds(server_pid) - cpu)


def serve_and_send(command: list[str], code: Path, port: int, aec: str, files: list[Path], parallel: int) -> Sent:
    """Start a server process (its own session), send `files` to it, stop it."""
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              cwd=code, env={**os.environ, "PYTHONPATH": str(code)})
    time.sleep(5)  # imports
    try:
        return send(server.pid, port, aec, files, parallel)
    finally:
        server.terminate()
        server.wait(timeout=30)


def serve_floor(port: int) -> None:
    """pynetdicom's own cost per C-STORE, with the receiver's AE, settings and server (its
    event-driven reactors included): every data set is acknowledged without being looked at,
    checked or stored."""
    from pynetdicom import evt

    from kaapana_assets.network.intake import SUCCESS
    from kaapana_assets.network.receiver import ReceiverServer, _nodelay, build_receiver

    ae = build_receiver("FLOOR")
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, _nodelay), (evt.EVT_C_STORE, lambda event: SUCCESS)]
    server = ae.make_server(("127.0.0.1", port), evt_handlers=handlers, server_class=ReceiverServer)
    server.serve_forever()


def count(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.dcm"))


def run(instances: int, parallelism: list[int], code: Path, workers: list[str]) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    from bench.orthanc import Orthanc
    from kaapana_assets.synthetic import generate_site

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files: list[Path] = []
        index = 0
        while len(files) < instances:
            study = generate_site(["site-a", "site-b", "site-c"][index % 3], 1, seed=9, out=root / "corpus",
                                  first_index=index // 3)[0]
            files += study.ct_files
            index += 1
        files = files[:instances]
        size_mb = sum(f.stat().st_size for f in files) / 1e6

        for parallel in parallelism:
            home = root / f"home-{parallel}"
            ours = serve_and_send([sys.executable, "-m", "kaapana_assets.cli", "receive", "--home", str(home),
                                   "--port", "11112", *workers], code, 11112, "KAAPANA", files, parallel)
            received = count(home / "incoming")
            floor = serve_and_send([sys.executable, str(Path(__file__).resolve()), "--serve-floor", "11113"], code,
                                   11113, "FLOOR", files, parallel)
            orthanc = Orthanc(root / f"orthanc-{parallel}", dicom_port=4242)
            try:
                theirs = send(orthanc.proc.pid, 4242, "ORTHANC", files, parallel)
                stored = orthanc.get("/statistics")["CountInstances"]
            finally:
                orthanc.stop()
            rows.append((parallel, ours, received, floor, theirs, stored))

    print(f"{len(files)} CT instances ({size_mb:.0f} MB), storescu with TCP_NODELAY=1, loopback; "
          f"kaapana receive {' '.join(workers) or '(default workers: ' + str(os.cpu_count()) + ')'} from {code}: durable "
          "before every acknowledgement; Orthanc 1.10 (Debian)")
    n = len(files)
    print(f"{'':12s} {'instances/s':>32s} {'ratio to Orthanc':>18s} {'CPU ms per instance':>28s}")
    print(f"{'associations':>12s} {'kaapana':>10s} {'floor':>10s} {'Orthanc':>10s} {'kaapana':>9s} {'floor':>8s}"
          f" {'kaapana':>9s} {'floor':>8s} {'Orthanc':>9s}  stored (ours/Orthanc's)")
    for parallel, ours, received, floor, theirs, stored in rows:
        print(f"{parallel:12d} {n / ours.seconds:10.0f} {n / floor.seconds:10.0f} {n / theirs.seconds:10.0f}"
              f" {theirs.seconds / ours.seconds:9.2f} {theirs.seconds / floor.seconds:8.2f}"
              f" {1000 * ours.cpu / n:9.2f} {1000 * floor.cpu / n:8.2f} {1000 * theirs.cpu / n:9.2f}  {received}/{stored}")
    print("goal: kaapana's ratio ≥ 1.5. floor: pynetdicom alone (the receiver's AE, settings and reactors; every\n"
          "C-STORE acknowledged unread, nothing stored): what any receiver built on pynetdicom can reach at most.\n"
          "CPU: the server's user + system time while the corpus was sent (all its threads and worker processes).")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4],
                        help="numbers of parallel associations (storescu processes) to measure")
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose `kaapana receive` runs (default: this one)")
    parser.add_argument("--workers", type=int, default=None,
                        help="`kaapana receive --workers` (default: the receiver's, the number of cores)")
    parser.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the floor's server process
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor(args.serve_floor)
        return 0
    from bench.orthanc import reexec_in_private_network

    code = reexec_in_private_network()
    if code is not None:
        return code
    run(args.instances, args.parallel, args.code.resolve(), [] if args.workers is None else ["--workers", str(args.workers)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
