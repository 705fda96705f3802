"""A real Orthanc (Debian's orthanc + orthanc-dicomweb) for benchmarks and the test suite.

Orthanc 1.10 listens on every interface and has no bind option, so callers run it inside
their own network namespace (`unshare -n`, as root): only that namespace's loopback exists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from kaapana_assets.federation.local import stop as stop_process

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


# What a test that starts Orthanc needs: `@pytest.mark.tools(*orthanc.TOOLS)`.
TOOLS = ("Orthanc", str(PLUGIN))


class Orthanc:
    def __init__(self, workdir: Path, http_port: int = 8042, dicom_port: int = 4242, aet: str = "ORTHANC",
                 dicomweb_servers: dict[str, str] | None = None):
        """`dicomweb_servers`: name → DICOMweb root URL that Orthanc's own DICOMweb client may
        push to (`POST /dicom-web/servers/{name}/stow`)."""
        self.workdir, self.http_port, self.dicom_port, self.aet = workdir, http_port, dicom_port, aet
        workdir.mkdir(parents=True, exist_ok=True)
        servers = {name: [url] for name, url in (dicomweb_servers or {}).items()}
        config = {
            "Name": "kaapana-test", "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
            "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": aet, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "UnknownSopClassAccepted": True,
            "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": servers},
            "ConcurrentJobs": 2, "StorageCompression": False,
        }
        (workdir / "orthanc.json").write_text(json.dumps(config))
        self.log = open(workdir / "orthanc.log", "w")
        # Orthanc is built on DCMTK, which reads TCP_NODELAY from its environment (Nagle otherwise).
        self.proc = subprocess.Popen(["Orthanc", str(workdir / "orthanc.json")], stdout=self.log,
                                     env={**os.environ, "TCP_NODELAY": "1"},
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not start: {(workdir / 'orthanc.log').read_text()[-2000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str):  # type: ignore[no-untyped-def]
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def send(self, method: str, path: str, body: object, timeout: float = 120):  # type: ignore[no-untyped-def]
        """A JSON request to the REST API (PUT /modalities/..., POST /modalities/.../store...)."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
        return json.loads(text) if text.strip() else None

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Register a DICOM node that Orthanc's own C-STORE SCU can push to."""
        self.send("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def push(self, modality: str, resources: list[str]) -> dict:
        """C-STORE `resources` (patient/study/series/instance IDs) to `modality`; waits for the job."""
        return self.send("POST", f"/modalities/{modality}/store", {"Resources": resources, "Synchronous": True})

    def upload(self, path: Path) -> dict:
        request = urllib.request.Request(self.url + "/instances", data=path.read_bytes(), method="POST",
                                         headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        stop_process(self.proc, grace_s=15)  # Orthanc takes 3–5 s to stop
        self.log.close()


def reexec_in_private_network() -> int | None:
    """Run this script again inside `unshare -n`, so that Orthanc (and our servers beside it)
    listen on a private loopback only: the exit code of that run, or None when this already is it."""
    if os.environ.get("KAAPANA_BENCH_NETNS") == "1":
        return None
    if os.geteuid() != 0 or not shutil.which("unshare"):
        print("needs root and unshare (Orthanc must not listen outside a private namespace)")
        return 2
    env = {**os.environ, "KAAPANA_BENCH_NETNS": "1"}
    return subprocess.call(["unshare", "-n", sys.executable, sys.argv[0], *sys.argv[1:]], env=env)
