"""WADO-RS on a 300-slice CT series: its metadata, and every frame of it, `kaapana dicomweb`
against Orthanc's DICOMweb plugin (Debian orthanc + orthanc-dicomweb), the same files in both,
same run, alternating.

    sudo python bench/dicomweb_wado.py [--slices 300] [--matrix 512] [--repeats 15] [--encoding NAME]

The series is one synthetic CT study (site-a's scanner, `--matrix`² pixels, Explicit VR Little
Endian, or re-encoded with `--encoding`, e.g. jpeg2000_lossless), ingested into a fresh home and
uploaded to Orthanc over its REST API. Then, over one kept-alive HTTP connection per server,
each side in turn:

- metadata: `GET …/series/{series}/metadata` (application/dicom+json). The first request of
  each side (after one QIDO request that takes each process past its first request) is printed
  apart (*cold*: we read every header; Orthanc reads its files or its cache); the median of the
  `--repeats` after it is the *warm* figure (ours: cached per series for the index version);
- frames: `GET …/instances/{i}/frames/1` for every instance of the series, one after the other
  (`multipart/related; type="application/octet-stream"; transfer-syntax=*`, what OHIF asks
  for: the frames as stored), the whole series' time per round; the bytes both sides return
  are checked to be the same.

Prints the medians and the ratios (Orthanc's time / ours: > 1 means ours is faster). Orthanc
listens on every interface, so the benchmark re-executes itself inside `unshare -n` (root).
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
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FRAMES_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


class Client:
    """One kept-alive HTTP connection; GET returns (seconds, body)."""

    def __init__(self, base_url: str):
        parts = urlsplit(base_url)
        self.prefix = parts.path.rstrip("/")
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)

    def get(self, path: str, accept: str) -> tuple[float, bytes]:
        for attempt in range(2):
            t0 = time.perf_counter()
            try:
                self.connection.request("GET", self.prefix + path, headers={"Accept": accept})
                response = self.connection.getresponse()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # the server closed the idle connection (uvicorn: after 5 s) while the other side
                # was being timed: reconnect, and time the request again from there
                self.connection.close()
                if attempt:
                    raise
        body = response.read()
        seconds = time.perf_counter() - t0
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {body[:300]!r}")
        return seconds, body


def _parts(body: bytes) -> list[bytes]:
    """The payloads of a multipart/related body (its first line is the first delimiter)."""
    boundary = body.lstrip(b"\r\n").split(b"\r\n", 1)[0]
    return [p.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n") for p in body.split(boundary)[1:-1]]


def run(slices: int, matrix: int, repeats: int, encoding: str | None) -> None:
    from bench.dicomweb_server import DicomwebServer
    from bench.orthanc import Orthanc
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.ingest.pipeline import ingest_files
    from kaapana_assets.synthetic import generate_site
    from kaapana_assets.synthetic.transcode import transcode

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    root = Path(tempfile.mkdtemp(prefix="bench-wado-"))
    ours = pacs = None
    try:
        t0 = time.perf_counter()
        study = generate_site("site-a", 1, seed=7, out=root / "data", slices=slices, matrix=matrix)[0]
        files = study.ct_files
        if encoding:
            files = [transcode(f, root / encoding / f.name, encoding) for f in files]
        generated = time.perf_counter() - t0
        home = KaapanaHome(root / "home")
        ingest_files(files, Archive.for_home(home), remove_sources=False)
        pacs = Orthanc(root / "orthanc")
        for f in files:
            pacs.upload(f)
        ours = DicomwebServer(home.root)
        print(f"one series of {len(files)} slices, {matrix}×{matrix}, {encoding or 'explicit_le'}: "
              f"generated in {generated:.1f} s; {sum(f.stat().st_size for f in files) / 2**20:.0f} MiB")

        clients = {"ours": Client(ours.url), "orthanc": Client(pacs.url + "/dicom-web")}
        series = f"/studies/{study.study_uid}/series/{study.series_uid}"

        for client in clients.values():  # each process past its first request (imports, index open)
            client.get("/studies?limit=1", "application/dicom+json")

        # metadata
        cold: dict[str, float] = {}
        warm: dict[str, list[float]] = {side: [] for side in clients}
        for round_ in range(repeats + 1):
            for side, client in (clients.items() if round_ % 2 == 0 else reversed(clients.items())):
                seconds, body = client.get(series + "/metadata", "application/dicom+json")
                if len(json.loads(body)) != len(files):
                    raise RuntimeError(f"{side}: metadata of {len(json.loads(body))} instances, not {len(files)}")
                if round_ == 0:
                    cold[side] = seconds
                else:
                    warm[side].append(seconds)

        # frames: every instance's frame 1, in instance order (SOP Instance UIDs from our metadata)
        _, body = clients["ours"].get(series + "/metadata", "application/dicom+json")
        sops = [item["00080018"]["Value"][0] for item in
                sorted(json.loads(body), key=lambda item: item["00200013"]["Value"][0])]
        frames: dict[str, list[float]] = {side: [] for side in clients}
        checked = False
        for round_ in range(max(3, repeats // 3) + 1):
            got: dict[str, list[bytes]] = {}
            for side, client in (clients.items() if round_ % 2 == 0 else reversed(clients.items())):
                t0 = time.perf_counter()
                got[side] = [b"".join(_parts(client.get(f"{series}/instances/{sop}/frames/1", FRAMES_ACCEPT)[1]))
                             for sop in sops]
                if round_ > 0:  # one warm-up round
                    frames[side].append(time.perf_counter() - t0)
            if not checked:
                if got["ours"] != got["orthanc"]:
                    raise RuntimeError("the frames differ between the two servers")
                checked = True

        rows = [
            ("series metadata, cold (first request)", cold["ours"], cold["orthanc"]),
            ("series metadata, warm (median)", statistics.median(warm["ours"]), statistics.median(warm["orthanc"])),
            (f"all {len(sops)} frames, one request each (median)", statistics.median(frames["ours"]),
             statistics.median(frames["orthanc"])),
        ]
        print(f"{'request':46s} {'ours ms':>9s} {'Orthanc ms':>11s} {'ratio':>7s}")
        for name, ours_s, theirs_s in rows:
            print(f"{name:46s} {1000 * ours_s:9.1f} {1000 * theirs_s:11.1f} {theirs_s / ours_s:7.2f}")
        print("ratio: Orthanc's time / ours (> 1: ours is faster). Goal: at least as fast as Orthanc (ratio ≥ 1).")
    finally:
        if ours is not None:
            ours.stop()
        if pacs is not None:
            pacs.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--encoding", default=None, help="re-encode the series first (synthetic/transcode.py names)")
    args = parser.parse_args()
    from bench.orthanc import reexec_in_private_network

    code = reexec_in_private_network()
    if code is not None:
        return code
    run(args.slices, args.matrix, args.repeats, args.encoding)
    return 0


if __name__ == "__main__":
    sys.exit(main())
