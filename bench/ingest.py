"""Ingest throughput against the reference tools, on the same generated files, same run,
on a corpus that mixes uncompressed and compressed transfer syntaxes.

    python bench/ingest.py [--instances 2000] [--workers 2] [--compressed-fraction 0.5] [--scale 20000]

Two corpora of synthetic studies (kaapana_assets.synthetic.generate_site, three site
profiles) are generated, and in each a `--compressed-fraction` of the CT instances is
re-encoded (kaapana_assets.synthetic.transcode, i.e. dcmtk, GDCM and OpenJPH) in the
lossless encapsulated syntaxes a PACS sends, plus some Implicit VR Little Endian and
Deflated Explicit VR Little Endian; site-a's (unsigned) CT also gets HTJ2K lossless. All
of this happens before any timing starts. Prints the composition per transfer syntax,
then instances/s for:
- our ingest end to end (header parse + validation, archive link/copy, Delta MERGE of
  instances/series/studies, sync, spool cleanup): *cold* is the first ingest_files call
  of this fresh process into an empty home: everything it does for the first time
  (lazy imports, parser start-up, creating the Delta tables, first use of deltalake and
  Arrow) is counted; importing the pipeline module itself is not, and is printed apart,
  measured in a fresh interpreter, with the cold rate that includes it. *warm* is a
  second, different corpus of the same size and mix in the same process and home (what
  a running site sees). Both also print the process CPU time they used (all threads and
  child processes), which the other load on a shared machine disturbs less than wall
  time;
- with `--scale N` (e.g. 20000): two more corpora, 1,000 and N instances, each ingested
  warm into its own fresh home; the per-instance cost of both and their ratio (how the
  cost grows with the batch count and the size of the tables);
- our header parse + validation alone (one process, no writes);
- a naive per-file pydicom `dcmread(stop_before_pixels=True)` (parse only, no writes);
- dcmtk's `dcm2json` once per file on the same files (how Kaapana extracts metadata);
and the ratios ours/pydicom and ours/dcm2json, then the same parse-only rates per
transfer syntax. Timings are wall clock on this machine; compare the ratios, measured in
the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Heavy imports live inside functions: spawned ingest workers re-import this module as
# their __main__, exactly as they re-import the light `kaapana` CLI entry point.
if TYPE_CHECKING:
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.ingest.pipeline import IngestReport

# What the selected CT instances are re-encoded as, in turn (per site). Lossless only: a
# lossy re-encoding gets a new SOP Instance UID and is another instance.
ROTATION = (
    "jpeg_lossless_sv1",
    "jpeg_lossless",
    "jpeg_ls_lossless",
    "rle",
    "jpeg2000_lossless",
    "implicit_le",
    "deflated",
)
# OpenJPH's raw reader takes unsigned samples only: site-a is the unsigned profile.
HTJ2K_SITES = frozenset({"site-a"})
SITES = ("site-a", "site-b", "site-c")


def make_corpus(root: Path, instances: int, seed: int = 2026) -> tuple[list[Path], dict[str, list[Path]]]:
    """All files of the generated studies, and the CT files per site."""
    from kaapana_assets.synthetic import generate_site

    files: list[Path] = []
    ct: dict[str, list[Path]] = defaultdict(list)
    index = 0
    while len(files) < instances:
        site = SITES[index % len(SITES)]
        study = generate_site(site, 1, seed=seed, out=root, with_annotations=True, first_index=index // len(SITES))[0]
        files += study.files
        ct[site] += study.ct_files
        index += 1
    return files, ct


def plan_transcodes(ct: dict[str, list[Path]], fraction: float) -> list[tuple[Path, str]]:
    """(file, encoding) for an evenly spread `fraction` of each site's CT instances, the
    encodings taken in turn so that every series holds several syntaxes."""
    plan: list[tuple[Path, str]] = []
    for site in sorted(ct):
        rotation = ROTATION + (("htj2k_lossless",) if site in HTJ2K_SITES else ())
        chosen = [f for i, f in enumerate(ct[site]) if int((i + 1) * fraction) > int(i * fraction)]
        plan += [(f, rotation[k % len(rotation)]) for k, f in enumerate(chosen)]
    return plan


def _transcode_in_place(path: Path, encoding: str) -> None:
    from kaapana_assets.synthetic.transcode import transcode

    tmp = path.with_name(path.name + f".{encoding}.tmp")
    try:
        transcode(path, tmp, encoding)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def transcode_all(plan: list[tuple[Path, str]], threads: int) -> list[str]:
    """Re-encode in place, `threads` tool processes at a time; the errors, if any."""
    from concurrent.futures import ThreadPoolExecutor

    errors = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = {pool.submit(_transcode_in_place, f, enc): (f, enc) for f, enc in plan}
        for fut, (f, enc) in futures.items():
            if (exc := fut.exception()) is not None:
                errors.append(f"{enc}: {f}: {type(exc).__name__}: {exc}")
    return errors


def syntax_names() -> dict[str, str]:
    from kaapana_assets.synthetic.transcode import ENCODINGS

    return {e.transfer_syntax: e.name for e in ENCODINGS}


def syntax_of(files: list[Path]) -> dict[Path, str]:
    """The transfer syntax each file says it is in (its name from ENCODINGS, else the UID)."""
    import pydicom

    names = syntax_names()
    out = {}
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        out[f] = names.get(uid, uid)
    return out


NOT_COMPRESSED = frozenset({"implicit_le", "explicit_le", "explicit_be"})


def print_composition(label: str, syntax: dict[Path, str]) -> None:
    counts = Counter(syntax.values())
    total = len(syntax)
    compressed = sum(n for s, n in counts.items() if s not in NOT_COMPRESSED)
    print(f"{label} corpus: {total} files, {compressed} compressed ({compressed / total:.0%}; deflated counted as compressed)")
    for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"    {name:22s} {n:6d}  {n / total:6.1%}")


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over the next `seconds` (Linux /proc/stat; nan elsewhere):
    whether something else is running while we time."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        return sum(ticks), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def cpu_seconds() -> float:
    """CPU time of this process (all threads), its waited-for children and its live
    children (a worker pool's processes: os.times does not see them until they end)."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    ticks = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile, or not Linux
        if int(fields[1]) == os.getpid():  # fields[1]: ppid; [11], [12]: utime, stime
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def pipeline_import_seconds() -> float:
    """Wall time to import the ingest pipeline in a fresh interpreter (median of 3)."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); t = time.perf_counter(); "
            "import kaapana_assets.ingest.pipeline; print(time.perf_counter() - t)")
    root = str(Path(__file__).resolve().parents[1])
    runs = sorted(float(subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True,
                                       check=True).stdout) for _ in range(3))
    return runs[1]


def timed_ingest(spool_files: list[Path], targets: Archive, workers: int) -> tuple[IngestReport, float, float]:
    """(report, wall seconds, CPU seconds) of one ingest_files call."""
    from kaapana_assets.ingest.pipeline import ingest_files

    c0, t0 = cpu_seconds(), time.perf_counter()
    report = ingest_files(spool_files, targets, workers=workers)
    return report, time.perf_counter() - t0, cpu_seconds() - c0


def scale_run(tmp_path: Path, sizes: tuple[int, ...], fraction: float, threads: int, workers: int) -> list[str]:
    """Per-instance cost at each corpus size, each ingested warm into its own fresh home.
    Prints the table; returns problems."""
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.home import KaapanaHome

    problems = []
    rows = []
    for k, size in enumerate(sizes):
        root = tmp_path / f"scale-{size}"
        t0 = time.perf_counter()
        files, ct = make_corpus(root / "corpus", size, seed=3000 + k)
        errors = transcode_all(plan_transcodes(ct, fraction), threads)
        problems += [f"scale {size}: transcode failed: {e}" for e in errors]
        print(f"scale corpus: {len(files)} instances generated and transcoded in {time.perf_counter() - t0:.1f}s (untimed)")
        report, wall, cpu = timed_ingest(files, Archive.for_home(KaapanaHome(root / "home")), workers)
        indexed = report.count("indexed")
        if indexed != len(files):
            problems.append(f"scale {size}: not all files indexed: {report.summary()}")
        rows.append((len(files), wall, cpu))
    print()
    print("per-instance cost against corpus size (warm, each into a fresh home):")
    print(f"{'instances':>9s} {'seconds':>8s} {'inst/s':>8s} {'µs/inst':>8s} {'CPU µs/inst':>11s}")
    for n, wall, cpu in rows:
        print(f"{n:9d} {wall:8.2f} {rate(n, wall):8.0f} {1e6 * wall / n:8.0f} {1e6 * cpu / n:11.0f}")
    (n0, w0, c0), (n1, w1, c1) = rows[0], rows[-1]
    print(f"growth {n1:,} vs {n0:,}: wall per instance ×{(w1 / n1) / (w0 / n0):.2f}, "
          f"CPU per instance ×{(c1 / n1) / (c0 / n0):.2f} (goal ≤ 1.2)")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dcm2json-sample", type=int, default=0, help="time dcm2json on only this many files (0: all)")
    parser.add_argument("--compressed-fraction", type=float, default=0.5,
                        help="share of the CT instances re-encoded in another transfer syntax (0..1)")
    parser.add_argument("--transcode-threads", type=int, default=(os.cpu_count() or 1) + 1,
                        help="tool processes run at a time while building the corpus (untimed)")
    parser.add_argument("--scale", type=int, default=0,
                        help="also ingest 1,000 and this many instances (warm, fresh homes) and compare "
                             "the per-instance cost (0: skip)")
    args = parser.parse_args()
    if not 0.0 <= args.compressed_fraction <= 1.0:
        parser.error("--compressed-fraction must be within 0..1")
    import_s = pipeline_import_seconds()  # in a fresh interpreter, before this one imports it
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.home import KaapanaHome

    problems: list[str] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        # ---- the corpora: generated and re-encoded before any timing -------------------
        t0 = time.perf_counter()
        files, ct = make_corpus(tmp_path / "corpus", args.instances)
        files2, ct2 = make_corpus(tmp_path / "corpus2", args.instances, seed=2027)  # the warm run's corpus
        print(f"corpus: 2 × ~{len(files)} instances generated in {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        plan = plan_transcodes(ct, args.compressed_fraction) + plan_transcodes(ct2, args.compressed_fraction)
        errors = transcode_all(plan, args.transcode_threads)
        print(f"transcoded {len(plan) - len(errors)}/{len(plan)} instances with {args.transcode_threads} "
              f"threads in {time.perf_counter() - t0:.1f}s (untimed)")
        for e in errors:
            problems.append(f"transcode failed: {e}")
            print(f"  TRANSCODE ERROR {e}")
        syntax = syntax_of(files)
        syntax2 = syntax_of(files2)
        print_composition("cold", syntax)
        print_composition("warm", syntax2)

        # ---- ours, end to end ----------------------------------------------------------
        busy_before = cpu_busy()  # the transcoding is over: anything busy now is not us
        load_before = os.getloadavg()
        targets = Archive.for_home(KaapanaHome(tmp_path / "home"))
        timings = []
        cpu_used: dict[str, float] = {}
        for label, corpus, corpus_syntax in (("cold", "corpus", syntax), ("warm", "corpus2", syntax2)):
            spool = tmp_path / f"spool-{label}"
            shutil.copytree(tmp_path / corpus, spool)  # the spool: ingest removes what it commits
            spool_files = list(spool.rglob("*.dcm"))
            report, wall, cpu = timed_ingest(spool_files, targets, args.workers)
            timings.append((label, len(spool_files), wall))
            cpu_used[label] = cpu
            summary = report.summary()
            print(f"{label}: {len(spool_files)} files -> " + ", ".join(f"{k} {v}" for k, v in summary.items()))
            if report.count("indexed") != len(spool_files):
                problems.append(f"{label}: not all files indexed: {summary}")
                by_spool = {str(spool / p.relative_to(tmp_path / corpus)): s for p, s in corpus_syntax.items()}
                per_reason: dict[tuple[str, str], list] = defaultdict(list)
                for r in report.files:
                    if r.status != "indexed":
                        per_reason[(str(r.status), str(r.reason))].append(r)
                for (status, reason), rs in sorted(per_reason.items()):
                    by_ts = Counter(by_spool.get(str(Path(r.source)), "?") for r in rs)
                    print(f"  {status} {reason}: {len(rs)} files; by syntax {dict(by_ts)}")
                    problems.append(f"{label}: {status} {reason}: {len(rs)} files; by syntax {dict(by_ts)}")
                    for r in rs[:3]:
                        print(f"    {by_spool.get(str(Path(r.source)), '?')}: {r.source}: {r.error}")

        # ---- parse only, per file, on the cold corpus ------------------------------------
        import pydicom

        from kaapana_assets.ingest.headers import Rejected, parse_header

        per_ts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        parse_rejected = []
        for f in {s: f for f, s in syntax.items()}.values():  # untimed: first-use imports per syntax
            with open(f, "rb") as fh:
                data = fh.read()
            try:
                parse_header(data)
            except Rejected:
                pass
            pydicom.dcmread(f, stop_before_pixels=True)
        for f in files:
            with open(f, "rb") as fh:
                data = fh.read()
            t = time.perf_counter()
            try:
                parse_header(data)
            except Rejected as exc:
                parse_rejected.append(f"{syntax[f]}: {f.name}: {exc.reason}: {exc.message}")
            per_ts["ours"][syntax[f]] += time.perf_counter() - t
        if parse_rejected:
            problems.append(f"parse_header rejected {len(parse_rejected)} files, e.g. {parse_rejected[:3]}")
        for f in files:
            t = time.perf_counter()
            pydicom.dcmread(f, stop_before_pixels=True)
            per_ts["pydicom"][syntax[f]] += time.perf_counter() - t

        results = [
            *((f"kaapana ingest, {args.workers} workers, end to end, {label}", n, sec) for label, n, sec in timings),
            ("kaapana header parse + validation (1 process, parse only)", len(files), sum(per_ts["ours"].values())),
            ("pydicom dcmread per file (1 process, parse only)", len(files), sum(per_ts["pydicom"].values())),
        ]
        counts = Counter(syntax.values())
        dcm2json_counts: Counter[str] = Counter()
        dcm2json = shutil.which("dcm2json")
        if dcm2json:
            sample = files[: args.dcm2json_sample] if args.dcm2json_sample else files
            dcm2json_failed = []
            for f in sample:
                t = time.perf_counter()
                done = subprocess.run([dcm2json, str(f)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                per_ts["dcm2json"][syntax[f]] += time.perf_counter() - t
                dcm2json_counts[syntax[f]] += 1
                if done.returncode != 0:
                    dcm2json_failed.append(f"{syntax[f]}: {f.name}: rc {done.returncode}: {done.stderr.decode()[:200]}")
            if dcm2json_failed:
                # Not ours: dcmtk 3.6.7's dcm2json always inlines PixelData and refuses to for
                # encapsulated (compressed) pixel data. The failed runs are timed like the others
                # (they read the whole file first); reported, not counted as our problem.
                by_ts = Counter(s.split(":", 1)[0] for s in dcm2json_failed)
                notes.append(f"dcm2json failed on {len(dcm2json_failed)}/{len(sample)} files "
                             f"(timed all the same), by syntax {dict(by_ts)}; e.g. {dcm2json_failed[0].strip()}")
            results.append(("dcmtk dcm2json once per file (Kaapana's way)", len(sample), sum(per_ts["dcm2json"].values())))
        else:
            print("dcm2json not found (apt-get install dcmtk): reference skipped")

    cold, warm = rate(timings[0][1], timings[0][2]), rate(timings[1][1], timings[1][2])
    print()
    print(f"compressed fraction {args.compressed_fraction:g} of CT; {args.workers} ingest workers; "
          f"{os.cpu_count()} CPUs; busy in the 1 s before timing: {busy_before:.0%} of all CPUs; "
          f"load avg then {load_before[0]:.2f} (includes this run's transcoding), now {os.getloadavg()[0]:.2f}")
    print(f"{'method':58s} {'files':>6s} {'seconds':>8s} {'inst/s':>8s} {'cold ×':>7s} {'warm ×':>7s}")
    for name, count, seconds in results:
        row_rate = rate(count, seconds)
        print(f"{name:58s} {count:6d} {seconds:8.2f} {row_rate:8.0f} {cold / row_rate:7.2f} {warm / row_rate:7.2f}")
    print("(cold × / warm ×: our end-to-end ingest rate over that row's rate, e.g. ours/pydicom, ours/dcm2json)")
    n_cold, s_cold = timings[0][1], timings[0][2]
    print(f"cold, CPU: {cpu_used['cold']:.2f} s ({rate(n_cold, cpu_used['cold']):.0f} inst per CPU second); "
          f"warm, CPU: {cpu_used['warm']:.2f} s ({rate(timings[1][1], cpu_used['warm']):.0f} inst per CPU second)")
    print(f"importing the pipeline in a fresh interpreter: {import_s:.2f} s (not in cold); cold with it: "
          f"{rate(n_cold, s_cold + import_s):.0f} inst/s")

    print()
    print("parse only, per transfer syntax, cold corpus (inst/s, 1 process):")
    print(f"{'syntax':22s} {'files':>6s} {'ours':>8s} {'pydicom':>8s} {'dcm2json':>8s} {'ours/pyd':>8s} {'ours/d2j':>8s}")
    for name in sorted(counts, key=lambda s: (-counts[s], s)):
        ours = rate(counts[name], per_ts["ours"][name])
        pyd = rate(counts[name], per_ts["pydicom"][name])
        d2j = rate(dcm2json_counts[name], per_ts["dcm2json"][name]) if dcm2json_counts[name] else float("nan")
        print(f"{name:22s} {counts[name]:6d} {ours:8.0f} {pyd:8.0f} {d2j:8.0f} {ours / pyd:8.2f} {ours / d2j:8.2f}")

    if args.scale:
        print()
        with tempfile.TemporaryDirectory() as tmp:
            problems += scale_run(Path(tmp), (1000, args.scale), args.compressed_fraction, args.transcode_threads,
                                  args.workers)

    if notes:
        print()
        print("notes:")
        for n in notes:
            print(f"  - {n}")
    if problems:
        print()
        print("PROBLEMS (bugs to report, not to hide):")
        for p in problems:
            print(f"  - {p}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
