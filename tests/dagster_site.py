"""A site's own Dagster webserver on loopback, for tests that drive sites over GraphQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from kaapana_assets.federation.local import free_port


class SiteWebserver:
    """`dagster-webserver -m definitions` with the site's own DAGSTER_HOME and KAAPANA_HOME."""

    def __init__(self, workdir: Path, env: dict[str, str], target: tuple[str, ...] = ("-m", "definitions"),
                 port: int | None = None):
        self.workdir = workdir
        self.dagster_home = workdir / "dagster_home"
        self.dagster_home.mkdir(parents=True, exist_ok=True)
        # No daemon here: runs start at once instead of waiting in the queue.
        (self.dagster_home / "dagster.yaml").write_text(
            "telemetry:\n  enabled: false\nrun_coordinator:\n  module: dagster.core.run_coordinator\n"
            "  class: DefaultRunCoordinator\n")
        self.port = port or free_port()
        self.log = (workdir / "webserver.log").open("wb")
        tmp = workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(self.port),
             *target],
            cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "DAGSTER_HOME": str(self.dagster_home), "TMPDIR": str(tmp),
                 "DAGSTER_DISABLE_TELEMETRY": "1", **env},
        )

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        query = {"query": "{ repositoriesOrError { ... on RepositoryConnection { nodes { name } } } }"}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"webserver exited: {(self.workdir / 'webserver.log').read_text()[-3000:]}")
            try:
                data = requests.post(f"http://{self.url}/graphql", json=query, timeout=5).json()
                if data["data"]["repositoriesOrError"].get("nodes"):
                    return
            except (requests.RequestException, KeyError, TypeError, ValueError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"webserver on {self.url} not ready after {timeout_s} s")

    def stop(self) -> None:
        """SIGTERM to the whole process group (webserver, code server, launched runs)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.log.close()
