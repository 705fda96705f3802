"""QIDO-RS study searches over 10,000 studies: `kaapana dicomweb` against Orthanc's DICOMweb
plugin (Debian orthanc + orthanc-dicomweb), the same studies in both, same run, alternating.

    sudo python bench/dicomweb_qido.py [--studies 10000] [--repeats 30]

Each study is one tiny CT slice (8×8 pixels; two studies per patient, dates over ten years),
written with pydicom, ingested into a fresh home (the index QIDO-RS answers from) and uploaded
to Orthanc over its REST API (`POST /instances`, 4 threads); both setups are timed. Each
query is then sent to one server and the other in turn, `--repeats` times after two warm-up
rounds (at least five where a query's rounds take over two minutes), each on a new HTTP
connection; the medians and the ratio (Orthanc's time / ours) are printed, with
the number of studies each answer held (they must agree).

Orthanc listens on every interface, so the benchmark re-executes itself inside `unshare -n`
(root): a network namespace whose only interface is its own loopback.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, query): raw query strings, since Orthanc 1.10's plugin does not decode percent-escapes.
QUERIES = (
    ("PatientID, exact", "/studies?PatientID=BENCH-{patient:05d}"),
    ("PatientName, wildcard", "/studies?PatientName=bench^patient{prefix}*"),
    ("StudyDate range, limit 100", "/studies?StudyDate=20200101-20201231&limit=100"),
    ("everything, offset 5000 limit 100", "/studies?offset={middle}&limit=100"),
    ("StudyDate range, all ~1/10", "/studies?StudyDate=20200101-20201231"),
)


QUERY_BUDGET_S = 120  # per query: fewer rounds where a side takes seconds


def generate(out: Path, studies: int) -> list[Path]:
    """`studies` single-slice CT studies, two per patient."""
    import datetime as dt

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

    from kaapana_assets.dicom.uids import deterministic_uid

    out.mkdir(parents=True, exist_ok=True)
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8).tobytes()
    files = []
    for i in range(studies):
        patient = i // 2
        date = dt.date(2015, 1, 1) + dt.timedelta(days=(i * 37) % 3650)
        sop = UID(deterministic_uid("bench-qido-sop", i))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = deterministic_uid("bench-qido-study", i)
        ds.SeriesInstanceUID = deterministic_uid("bench-qido-series", i)
        ds.PatientName, ds.PatientID = f"Bench^Patient{patient:05d}", f"BENCH-{patient:05d}"
        ds.PatientBirthDate, ds.PatientSex = "19600101", "FO"[patient % 2]
        ds.StudyDate = ds.SeriesDate = date.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = "093000"
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = f"B{i:07d}", str(i + 1), ""
        ds.StudyDescription, ds.SeriesDescription = "CT ABDOMEN", "Abdomen"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, 1
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels
        path = out / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


class Client:
    """GET on a new connection per request (neither server's keep-alive policy enters the
    figures; a loopback connect costs tens of microseconds): (seconds, studies in the answer)."""

    def __init__(self, name: str, base_url: str):
        parts = urlsplit(base_url)
        self.name, self.prefix = name, parts.path.rstrip("/")
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port

    def get(self, query: str) -> tuple[float, int]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            t0 = time.perf_counter()
            connection.request("GET", self.prefix + query, headers={"Accept": "application/dicom+json"})
            response = connection.getresponse()
            body = response.read()
            seconds = time.perf_counter() - t0
        except OSError as exc:
            raise RuntimeError(f"{self.name}: {query}: {exc!r}") from exc
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"{self.name}: {query}: {response.status} {body[:300]!r}")
        return seconds, len(json.loads(body)) if body.strip() else 0


def run(studies: int, repeats: int) -> None:
    from bench.dicomweb_server import DicomwebServer
    from bench.orthanc import Orthanc
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.ingest.pipeline import ingest_files

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    root = Path(tempfile.mkdtemp(prefix="bench-qido-"))
    ours = pacs = None
    try:
        t0 = time.perf_counter()
        files = generate(root / "data", studies)
        generated = time.perf_counter() - t0
        home = KaapanaHome(root / "home")
        t0 = time.perf_counter()
        ingest_files(files, Archive.for_home(home), remove_sources=False)
        ingested = time.perf_counter() - t0
        pacs = Orthanc(root / "orthanc")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(pacs.upload, files))
        uploaded = time.perf_counter() - t0
        ours = DicomwebServer(home.root)
        print(f"{studies} studies: generated in {generated:.1f} s; ingested in {ingested:.1f} s; "
              f"uploaded to Orthanc in {uploaded:.1f} s", flush=True)

        clients = {"ours": Client("ours", ours.url), "orthanc": Client("Orthanc", pacs.url + "/dicom-web")}
        values = {"patient": studies // 4 + 7, "prefix": f"{studies // 4 // 10:04d}", "middle": studies // 2}
        print(f"{'query':36s} {'ours ms':>9s} {'Orthanc ms':>11s} {'ratio':>7s} {'studies':>8s} {'rounds':>7s}", flush=True)
        for name, template in QUERIES:
            query = template.format(**values)
            times: dict[str, list[float]] = {side: [] for side in clients}
            found: dict[str, set[int]] = {side: set() for side in clients}
            started = time.monotonic()
            for round_ in range(repeats + 2):
                if round_ >= 7 and time.monotonic() - started > QUERY_BUDGET_S:
                    break  # a slow query: five timed rounds are enough
                for side, client in (clients.items() if round_ % 2 == 0 else reversed(clients.items())):
                    seconds, count = client.get(query)
                    found[side].add(count)
                    if round_ >= 2:  # two warm-up rounds: caches filled on both sides
                        times[side].append(seconds)
            if found["ours"] != found["orthanc"] or len(found["ours"]) != 1:
                raise RuntimeError(f"{query}: studies found differ: ours {found['ours']}, Orthanc {found['orthanc']}")
            ours_ms, theirs_ms = (1000 * statistics.median(times[side]) for side in ("ours", "orthanc"))
            print(f"{name:36s} {ours_ms:9.1f} {theirs_ms:11.1f} {theirs_ms / ours_ms:7.2f} {found['ours'].pop():8d}"
                  f" {len(times['ours']):7d}", flush=True)
        print("ratio: Orthanc's median time / ours (> 1: ours is faster). Goal: every study search under 100 ms "
              "and at least as fast as Orthanc (ratio ≥ 1).")
    except Exception:
        if pacs is not None:
            print("Orthanc's log:", (root / "orthanc" / "orthanc.log").read_text()[-2000:], sep="\n")
        if ours is not None:
            print("our log:", ours.log()[-2000:], sep="\n")
        raise
    finally:
        if ours is not None:
            ours.stop()
        if pacs is not None:
            pacs.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    from bench.orthanc import reexec_in_private_network

    code = reexec_in_private_network()
    if code is not None:
        return code
    run(args.studies, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
