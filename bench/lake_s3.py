"""The lake on an S3 API against the lake on local disk, same run, alternating.

    python bench/lake_s3.py [--instances 2000] [--segs 40] [--repeats 2] [--workers 2]

One corpus of synthetic studies (kaapana_assets.synthetic, three site profiles, small
grids) is generated before any timing. Each repeat, in alternating order, then:
- ingests the whole corpus into a fresh home whose lake is a local folder, and into a
  fresh home whose lake is s3://… on moto's S3 server on loopback (bench/s3_server.py;
  the archive's files stay on local disk in both);
- commits a burst of `--segs` segmentations' statistics, one MERGE into `segmentations`
  per SEG (three labels each), as segmentation/segment.py's commit_segs ends each SEG.
Prints instances/s and commits/s (Delta versions committed over wall time) for each,
and the ratio S3/local of the wall times (goal ≤ 1.3×), median over the repeats. moto is
a Python server on the same two cores: a production store answers on other machines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SITES = ("site-a", "site-b", "site-c")


def make_corpus(root: Path, instances: int) -> list[Path]:
    from kaapana_assets.synthetic import generate_site

    files: list[Path] = []
    index = 0
    while len(files) < instances:
        study = generate_site(SITES[index % 3], 1, seed=2026, out=root, slices=40, matrix=64,
                              first_index=index // 3)[0]
        files += study.files
        index += 1
    return files


def committed(lake, before: dict[str, int | None]) -> int:  # type: ignore[no-untyped-def]
    """Versions committed since `before` (table → version; an absent table counts from -1)."""
    return sum(v - (before[k] if before.get(k) is not None else -1)  # type: ignore[operator]
               for k, v in lake.versions().items() if v is not None and (not before or k in before))


def ingest(files: list[Path], lake, home: Path, workers: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.ingest.pipeline import INDEXED, ingest_files

    archive = Archive.for_home(KaapanaHome(home), lake)
    t0 = time.perf_counter()
    report = ingest_files([str(f) for f in files], archive, workers=workers, remove_sources=False)
    wall = time.perf_counter() - t0
    assert report.count(INDEXED) == len(files), f"{report.count(INDEXED)} of {len(files)} indexed"
    return wall, committed(lake, {})


def seg_burst(lake, segs: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    import pyarrow as pa

    from kaapana_assets.lake.schemas import SEGMENTATIONS

    before = lake.versions([SEGMENTATIONS])
    t0 = time.perf_counter()
    for n in range(segs):
        rows = [{"seg_sop_instance_uid": f"2.25.{n}", "label": label, "label_value": value, "series_uid": f"1.3.{n}",
                 "seg_series_uid": f"2.25.{n}.1", "model_name": "bench", "model_version": "1", "voxel_count": 1000}
                for value, label in enumerate(("liver", "spleen", "kidney"), start=1)]
        lake.merge(SEGMENTATIONS, pa.Table.from_pylist(rows, schema=SEGMENTATIONS.schema))
    return time.perf_counter() - t0, committed(lake, before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--segs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from bench.s3_server import S3Server
    from kaapana_assets.lake import Lake

    with tempfile.TemporaryDirectory(prefix="bench-lake-s3-") as tmp:
        root = Path(tmp)
        files = make_corpus(root / "corpus", args.instances)
        print(f"{len(files)} instances generated; S3: moto_server on loopback")
        server = S3Server(log=root / "moto.log")
        results: dict[tuple[str, str], list[tuple[float, int]]] = {}
        try:
            for repeat in range(args.repeats):
                order = ("local", "s3") if repeat % 2 == 0 else ("s3", "local")
                for where in order:
                    home = root / f"{where}-{repeat}"
                    lake = Lake(home / "lake") if where == "local" else server.lake(uuid.uuid4().hex)
                    lake.check_writable()  # the one probe per process, outside the timing
                    results.setdefault(("ingest", where), []).append(ingest(files, lake, home, args.workers))
                    results.setdefault(("segmentation burst", where), []).append(seg_burst(lake, args.segs))
                    for what in ("ingest", "segmentation burst"):
                        wall, commits = results[(what, where)][-1]
                        print(f"  repeat {repeat + 1} {where:5} {what}: {wall:.2f} s, {commits} commits")
        finally:
            server.stop()
    print()
    for what, count, unit in (("ingest", len(files), "instances"), ("segmentation burst", args.segs, "SEGs")):
        local = statistics.median(w for w, _ in results[(what, "local")])
        s3 = statistics.median(w for w, _ in results[(what, "s3")])
        commits = {where: statistics.median(c / w for w, c in results[(what, where)]) for where in ("local", "s3")}
        print(f"{what}: local {count / local:.1f} {unit}/s, {commits['local']:.1f} commits/s; "
              f"S3 {count / s3:.1f} {unit}/s, {commits['s3']:.1f} commits/s; S3/local wall {s3 / local:.2f}x "
              f"(goal <= 1.3x)")


if __name__ == "__main__":
    main()
