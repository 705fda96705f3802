"""DICOM receive throughput: dcmtk's storescu (TCP_NODELAY=1) sends the same synthetic
corpus to `kaapana receive` and to Orthanc, all on one private loopback, over 1, 2 and 4
parallel associations (one storescu process each, the corpus split between them).

    sudo python bench/receive.py [--instances 1000] [--parallel 1 2 4] [--code DIR]

Orthanc listens on every interface, so the benchmark re-executes itself inside
`unshare -n` (root): a network namespace whose only interface is its own loopback.
Prints total instances/s for both and the ratio (goal ≥ 1.5× Orthanc). Both run in the
same process, one after the other, per parallelism: compare the ratios, not the absolute
figures, on a loaded machine. `--code DIR` runs `kaapana receive` from another checkout
(e.g. `git archive` of an earlier commit) for a before/after comparison on the same data.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def count(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.dcm"))


def run(instances: int, parallelism: list[int], code: Path) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    from kaapana_assets.synthetic import generate_site
    from tests.orthanc import Orthanc

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
            receiver = subprocess.Popen([sys.executable, "-m", "kaapana_assets.cli", "receive", "--home", str(home),
                                         "--port", "11112"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True, cwd=code, env={**os.environ, "PYTHONPATH": str(code)})
            time.sleep(5)  # imports
            try:
                ours = storescu(11112, "KAAPANA", files, parallel)
                received = count(home / "incoming")
            finally:
                receiver.terminate()
                receiver.wait(timeout=30)
            orthanc = Orthanc(root / f"orthanc-{parallel}", dicom_port=4242)
            try:
                theirs = storescu(4242, "ORTHANC", files, parallel)
                stored = orthanc.get("/statistics")["CountInstances"]
            finally:
                orthanc.stop()
            rows.append((parallel, ours, received, theirs, stored))

    print(f"{len(files)} CT instances ({size_mb:.0f} MB), storescu with TCP_NODELAY=1, loopback; "
          f"kaapana receive from {code}: durable before every acknowledgement; Orthanc 1.10 (Debian)")
    print(f"{'associations':>12s} {'kaapana inst/s':>15s} {'Orthanc inst/s':>15s} {'ratio':>6s}  stored (ours/theirs)")
    for parallel, ours, received, theirs, stored in rows:
        print(f"{parallel:12d} {len(files) / ours:15.0f} {len(files) / theirs:15.0f} {theirs / ours:6.2f}"
              f"  {received}/{stored}")
    print("goal: ratio ≥ 1.5")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4],
                        help="numbers of parallel associations (storescu processes) to measure")
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose `kaapana receive` runs (default: this one)")
    args = parser.parse_args()
    if os.environ.get("KAAPANA_BENCH_NETNS") != "1":
        if os.geteuid() != 0 or not shutil.which("unshare"):
            print("needs root and unshare (Orthanc must not listen outside a private namespace)")
            return 2
        env = {**os.environ, "KAAPANA_BENCH_NETNS": "1"}
        return subprocess.call(["unshare", "-n", sys.executable, __file__, *sys.argv[1:]], env=env)
    run(args.instances, args.parallel, args.code.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
