"""`kaapana gateway` as a real process (uvicorn) in front of services on loopback, for the
benchmark and the test suite; its secrets written to files as Kubernetes mounts them."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from kaapana_assets.federation.local import stop as stop_process


class GatewayServer:
    def __init__(self, workdir: Path, home: Path, issuer: str, client_id: str, client_secret: str, audience: str,
                 upstreams: dict[str, str], identity_secret: Path, scope: str = "openid profile",
                 viewer: bool = False, cohorts: Path | None = None):
        from kaapana_assets.federation.local import free_port

        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.viewer_port = free_port() if viewer else None
        client_file, session_file = workdir / "client-secret", workdir / "session-secret"
        client_file.write_text(client_secret)
        session_file.write_text(secrets.token_urlsafe(32))
        self.log_path = workdir / f"gateway-{self.port}.log"
        command = [sys.executable, "-m", "kaapana_assets.cli", "gateway", "--home", str(home), "--host", "127.0.0.1",
                   "--port", str(self.port), "--issuer", issuer, "--client-id", client_id, "--client-secret-file",
                   str(client_file), "--audience", audience, "--scope", scope, "--session-secret-file",
                   str(session_file), "--identity-secret-file", str(identity_secret)]
        command += [arg for name, url in upstreams.items() for arg in (f"--{name}", url)]
        if self.viewer_port:
            command += ["--viewer-port", str(self.viewer_port)]
        if cohorts is not None:
            command += ["--cohorts", str(cohorts)]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/auth/whoami", timeout=5):
                    return
            except urllib.error.HTTPError:
                return  # 401: up, and nobody logged in
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"kaapana gateway did not start: {self.log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def viewer_url(self) -> str:
        return f"http://127.0.0.1:{self.viewer_port}"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc, grace_s=30)
