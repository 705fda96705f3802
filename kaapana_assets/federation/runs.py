"""Start one Flower run from the hub: `flwr run` (Flower's public CLI, which talks to the
SuperLink's Control API) with the app folder below, streaming the ServerApp's log, then the
result the ServerApp left in the hub's federation folder.

The app folder is written here, not shipped: a pyproject.toml naming our ServerApp and
ClientApp (APP_MODULE, the top of those processes: it registers the steps), which are
imported from the installed `kaapana_assets` on both ends (the SuperLink and every
SuperNode run with runtime dependency installation off)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kaapana_assets.federation.store import FederationStore

APP_NAME = "kaapana-federated"
APP_VERSION = "1.0.0"
APP_MODULE = "kaapana_assets.flower_apps"  # its `serverapp` and `clientapp`
CONNECTION = "hub"
APP_PYPROJECT = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "{APP_VERSION}"
description = "kaapana_assets federated nnU-Net: one Flower run per plan or round"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "kaapana"

[tool.flwr.app.components]
serverapp = "{APP_MODULE}:serverapp"
clientapp = "{APP_MODULE}:clientapp"

[tool.flwr.app.config]
step = "plan"
experiment = ""
round = 0
federation-dir = ""
federation-file = ""
token = ""
timeout = 3600.0
ttl = 43200.0
"""


@dataclass(frozen=True)
class Connection:
    """How the hub reaches its SuperLink's Control API."""

    address: str  # host:port
    root_certificate: Path  # the CA that signed the SuperLink's certificate
    flwr_home: Path  # FLWR_HOME for the `flwr` CLI (its config.toml and installed apps)

    def write_config(self) -> Path:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        path.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                        f'address = "{self.address}"\nroot-certificates = "{self.root_certificate}"\n')
        return path

    def app_folder(self) -> Path:
        folder = self.flwr_home / "kaapana-app"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pyproject.toml").write_text(APP_PYPROJECT)
        return folder


class FlowerRunFailed(RuntimeError):
    pass


def _flwr() -> str:
    return str(Path(sys.executable).with_name("flwr"))


def run_step(connection: Connection, store: FederationStore, federation_file: Path, step: str, experiment: str,
             round_: int, timeout_s: float, ttl_s: float, log: Callable[[str], None]) -> dict:
    """Start the Flower run for one step, stream its log, return the ServerApp's result."""
    connection.write_config()
    token = f"{step}-{round_:04d}-{uuid.uuid4().hex[:12]}"
    config = {"step": step, "experiment": experiment, "round": round_, "federation-dir": str(store.root.resolve()),
              "federation-file": str(Path(federation_file).resolve()), "token": token,
              "timeout": float(timeout_s), "ttl": float(ttl_s)}
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    command = [_flwr(), "run", str(connection.app_folder()), CONNECTION, "--stream", "--run-config", overrides]
    env = {**os.environ, "FLWR_HOME": str(connection.flwr_home)}
    tail: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          start_new_session=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            if line:
                tail = (tail + [line])[-40:]
                log(line)
        code = process.wait()
    path = store.result_path(experiment, token)
    if not path.exists():
        raise FlowerRunFailed(f"the Flower run for {step} of {experiment} left no result (flwr exited {code}); "
                              "last lines:\n" + "\n".join(tail[-15:]))
    return json.loads(path.read_text())
