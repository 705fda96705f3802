"""DICOM receive throughput: dcmtk's storescu (TCP_NODELAY=1) sends the same synthetic
corpus to `kaapana receive` and to Orthanc, all on one private loopback.

    sudo python bench/receive.py [--instances 1000]

Orthanc listens on every interface, so the benchmark re-executes itself inside
`unshare -n` (root): a network namespace whose only interface is its own loopback.
Prints instances/s for both and the ratio (goal ≥ 1.5× Orthanc).
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


def storescu(port: int, aec: str, files: list[Path]) -> float:
    env = {**os.environ, "TCP_NODELAY": "1"}
    t0 = time.perf_counter()
    # One association for the whole corpus, as a modality sending a batch would.
    subprocess.run(["storescu", "-R", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                   env=env, check=True, capture_output=True, timeout=1800)
    return time.perf_counter() - t0


def run(instances: int) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    from kaapana_assets.synthetic import generate_site
    from tests.orthanc import Orthanc

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

        receiver = subprocess.Popen([sys.executable, "-m", "kaapana_assets.cli", "receive", "--home", str(root / "home"),
                                     "--port", "11112"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
        time.sleep(5)  # imports
        try:
            ours = storescu(11112, "KAAPANA", files)
            received = len(list((root / "home" / "incoming").rglob("*.dcm")))
        finally:
            receiver.terminate()
            receiver.wait(timeout=30)
        orthanc = Orthanc(root / "orthanc", dicom_port=4242)
        try:
            theirs = storescu(4242, "ORTHANC", files)
            stored = orthanc.get("/statistics")["CountInstances"]
        finally:
            orthanc.stop()

    print(f"{len(files)} CT instances ({size_mb:.0f} MB), storescu with TCP_NODELAY=1, one association, loopback")
    print(f"{'kaapana receive (fsync per instance)':40s} {ours:7.2f} s {len(files) / ours:8.0f} inst/s  ({received} stored)")
    print(f"{'Orthanc 1.10 (Debian)':40s} {theirs:7.2f} s {len(files) / theirs:8.0f} inst/s  ({stored} stored)")
    print(f"{'ratio kaapana / Orthanc':40s} {theirs / ours:7.2f}   (goal ≥ 1.5)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=1000)
    args = parser.parse_args()
    if os.environ.get("KAAPANA_BENCH_NETNS") != "1":
        if os.geteuid() != 0 or not shutil.which("unshare"):
            print("needs root and unshare (Orthanc must not listen outside a private namespace)")
            return 2
        env = {**os.environ, "KAAPANA_BENCH_NETNS": "1"}
        return subprocess.call(["unshare", "-n", sys.executable, __file__, *sys.argv[1:]], env=env)
    run(args.instances)
    return 0


if __name__ == "__main__":
    sys.exit(main())
