"""`kaapana dicomweb` as a real process (uvicorn) over a home, for benchmarks and the test suite."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.orthanc import Orthanc
from kaapana_assets.federation.local import stop as stop_process


class DicomwebServer:
    """`kaapana dicomweb` as a real process (uvicorn) over a home, with its log."""

    def __init__(self, home: Path, options: tuple[str, ...] = ()):
        from kaapana_assets.federation.local import free_port

        self.port = free_port()
        self.log_path = home.parent / f"dicomweb-{self.port}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kaapana_assets.cli", "dicomweb", "--home", str(home), "--port", str(self.port),
                 *options], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/studies?limit=1", timeout=5):
                    return
            except urllib.error.HTTPError:
                return  # it answers (401 behind the gateway: no identity here)
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"kaapana dicomweb did not start: {self.log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc, grace_s=30)


@contextmanager
def beside_orthanc(home: Path, files: Iterable[Path | str], workdir: Path) -> Iterator[tuple[DicomwebServer, Orthanc]]:
    """Our service over `home` and an Orthanc holding `files` (uploaded over REST), both on this
    network namespace's loopback (brought up here): the peers of the parity tests and benches."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    ours = DicomwebServer(home)
    pacs = None
    try:
        pacs = Orthanc(workdir)
        for path in files:
            pacs.upload(Path(path))
        yield ours, pacs
    finally:
        if pacs is not None:
            pacs.stop()
        ours.stop()
