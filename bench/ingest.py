"""Ingest throughput against the reference tools, on the same generated files, same run.

    python bench/ingest.py [--instances 2000] [--workers 2]

Prints instances/s for:
- our ingest end to end (header parse + validation, archive link/copy, Delta MERGE of
  instances/series/studies, sync, spool cleanup): *cold* in this fresh process (imports
  and worker-pool start-up counted) and *warm* (a second, different corpus of the same
  size in the same process: what a running site sees);
- a naive per-file pydicom `dcmread(stop_before_pixels=True)` (parse only, no writes);
- dcmtk's `dcm2json` once per file on the same files (how Kaapana extracts metadata).
Timings are wall clock on this machine; compare the ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Heavy imports live inside functions: spawned ingest workers re-import this module as
# their __main__, exactly as they re-import the light `kaapana` CLI entry point.


def make_corpus(root: Path, instances: int, seed: int = 2026) -> list[Path]:
    from kaapana_assets.synthetic import generate_site

    files: list[Path] = []
    sites = ["site-a", "site-b", "site-c"]
    index = 0
    while len(files) < instances:
        site = sites[index % len(sites)]
        study = generate_site(site, 1, seed=seed, out=root, with_annotations=True, first_index=index // len(sites))[0]
        files += study.files
        index += 1
    return files


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dcm2json-sample", type=int, default=0, help="time dcm2json on only this many files (0: all)")
    args = parser.parse_args()
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.ingest.pipeline import IngestTargets, ingest_files

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        files = make_corpus(tmp_path / "corpus", args.instances)
        make_corpus(tmp_path / "corpus2", args.instances, seed=2027)  # the warm run's different corpus
        print(f"corpus: 2 × ~{len(files)} instances generated in {time.perf_counter() - t0:.1f}s")

        targets = IngestTargets.for_home(KaapanaHome(tmp_path / "home"))
        timings = []
        for label, corpus in (("cold", "corpus"), ("warm", "corpus2")):
            spool = tmp_path / f"spool-{label}"
            shutil.copytree(tmp_path / corpus, spool)  # the spool: ingest removes what it commits
            spool_files = list(spool.rglob("*.dcm"))
            t0 = time.perf_counter()
            report = ingest_files(spool_files, targets, workers=args.workers)
            timings.append((label, len(spool_files), time.perf_counter() - t0))
            assert report.count("indexed") == len(spool_files), report.summary()

        import pydicom

        from kaapana_assets.ingest.headers import parse_header

        t0 = time.perf_counter()
        for f in files:
            pydicom.dcmread(f, stop_before_pixels=True)
        naive = time.perf_counter() - t0
        t0 = time.perf_counter()
        for f in files:
            with open(f, "rb") as fh:
                parse_header(fh.read())
        parse_only = time.perf_counter() - t0

        results = [
            *((f"kaapana ingest, {args.workers} workers, end to end, {label}", n, sec) for label, n, sec in timings),
            ("kaapana header parse + validation (1 process, parse only)", len(files), parse_only),
            ("pydicom dcmread per file (1 process, parse only)", len(files), naive),
        ]
        dcm2json = shutil.which("dcm2json")
        if dcm2json:
            sample = files[: args.dcm2json_sample] if args.dcm2json_sample else files
            t0 = time.perf_counter()
            for f in sample:
                subprocess.run([dcm2json, str(f)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            results.append(("dcmtk dcm2json once per file (Kaapana's way)", len(sample), time.perf_counter() - t0))
        else:
            print("dcm2json not found (apt-get install dcmtk): reference skipped")

    print()
    print(f"{'method':58s} {'files':>6s} {'seconds':>8s} {'inst/s':>8s} {'cold ×':>7s} {'warm ×':>7s}")
    cold, warm = rate(timings[0][1], timings[0][2]), rate(timings[1][1], timings[1][2])
    for name, count, seconds in results:
        r = rate(count, seconds)
        print(f"{name:58s} {count:6d} {seconds:8.2f} {r:8.0f} {cold / r:7.1f} {warm / r:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
