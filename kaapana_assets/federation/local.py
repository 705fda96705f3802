"""A whole federation on this machine, for the demo and the tests: a
SuperLink and, per site, a SuperNode and its SuperExec as process groups of this process on
loopback, with the same commands and flags as in production (superlink.py), and the
process utilities that start and end them (by process group and PID, never by name).
Production code never imports this module."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kaapana_assets.federation.credentials import create_hub_certificates, create_node_keys
from kaapana_assets.federation.runs import CONNECTION, Connection
from kaapana_assets.federation.superlink import (
    flower_bin,
    register_node,
    superexec_command,
    superlink_command,
    supernode_command,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float = 60.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


def descendants(pid: int) -> list[int]:
    """Child processes, recursively (Linux /proc). Flower starts its SuperExec and app
    processes in sessions of their own, so the process group alone does not reach them."""
    found: list[int] = []
    queue = [pid]
    while queue:
        current = queue.pop()
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                children = [int(c) for c in task.read_text().split()]
            except OSError:
                continue
            found.extend(children)
            queue.extend(children)
    return found


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop(process: subprocess.Popen, grace_s: float = 10.0, sig: signal.Signals = signal.SIGTERM) -> None:
    """End a process we started and every process it started, by process group and PID
    (never by name). SIGTERM lets a SuperNode or SuperLink deactivate itself first."""
    stop_all([process], grace_s, sig)


def stop_all(processes: list[subprocess.Popen], grace_s: float = 10.0, sig: signal.Signals = signal.SIGTERM) -> None:
    """stop() for several processes at once: every group is signalled before any is waited
    for, so their shutdowns overlap and the grace period runs once."""
    children = [pid for process in processes for pid in descendants(process.pid)]
    running = [process for process in processes if process.poll() is None]
    for process in running:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for process in running:
        try:
            process.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_all([pid for pid in children if Path(f"/proc/{pid}").exists()], signal.SIGKILL)


@dataclass
class LocalSite:
    name: str
    home: Path
    key: str  # the site's signing key (base64)
    device: str = "cpu"
    threads: int = 2
    # Variables of the site's own platform for its SuperExec, e.g. its KAAPANA_LAKE_URI when
    # the sites' lakes share one object store.
    environment: dict[str, str] = field(default_factory=dict)
    share_local_model: bool = False  # consents to cross-site evaluation (node config share-local-model)


@dataclass
class LocalFederation:
    """A SuperLink and one SuperNode per site, as process groups of this process."""

    folder: Path  # the hub's flower folder: certificates, keys, state, logs
    sites: list[LocalSite]
    port: int = 0
    connection: Connection = field(init=False)
    superlink: subprocess.Popen | None = None
    supernodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    superexecs: dict[str, subprocess.Popen] = field(default_factory=dict)  # each site's kaapana-superexec

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        certificates = self.folder / "certificates"
        if not (certificates / "server.pem").exists():
            create_hub_certificates(certificates, ["localhost", "127.0.0.1"])
        self.certificates = {"ca": certificates / "ca.pem", "certificate": certificates / "server.pem",
                             "key": certificates / "server.key"}
        self.connection = Connection(f"127.0.0.1:{self.port}", self.certificates["ca"], self.folder / "flwr-hub")
        (self.folder / "logs").mkdir(exist_ok=True)

    def _spawn(self, command: list[str], log_name: str, env: Mapping[str, str] | None = None) -> subprocess.Popen:
        log = open(self.folder / "logs" / log_name, "ab")  # noqa: SIM115 - owned by the process
        # Flower starts flower-superexec and the app processes by name: our interpreter's bin first.
        base = dict(os.environ)  # passed on, not read: the children inherit this process's environment
        base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
        base["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**base, **(env or {})},
                                start_new_session=True)

    def node_keys(self, site: str) -> tuple[Path, Path]:
        private = self.folder / "node-keys" / f"{site}.key"
        return (private, private.with_suffix(".pub")) if private.exists() else create_node_keys(private.parent, site)

    def start_superlink(self) -> None:
        # Local mode starts a fresh SuperLink each time, its state (registered keys, runs) with it,
        # so that state is kept in memory: Flower's SQLite state answers "database is locked"
        # (its busy timeout is 5 s) when the machine's disk is saturated, and the ServerApp of
        # the round dies of the 500 (seen with the demo on 2 cores under load).
        self.superlink = self._spawn(superlink_command(self.certificates, "127.0.0.1", self.port, None),
                                     "superlink.log",
                                     {"FLWR_HOME": str(self.folder / "flwr-superlink")})
        wait_for_port("127.0.0.1", self.port, process=self.superlink)

    def register(self, site: str) -> None:
        register_node(self.connection, self.node_keys(site)[1])

    def start_site(self, site: LocalSite, private_key: Path | None = None) -> subprocess.Popen:
        """The site's SuperNode, then its SuperExec once the SuperNode's runtime API listens."""
        return self.start_sites([site], {site.name: private_key} if private_key else None)[site.name]

    def start_sites(self, sites: list[LocalSite],
                    private_keys: Mapping[str, Path] | None = None) -> dict[str, subprocess.Popen]:
        """Every site's SuperNode at once (each spends seconds importing Flower before its
        runtime API listens), then each one's SuperExec as that API comes up."""
        runtime_ports = {}
        for site in sites:
            runtime_ports[site.name] = free_port()
            command = supernode_command(self.connection.address, self.certificates["ca"],
                                        (private_keys or {}).get(site.name) or self.node_keys(site.name)[0],
                                        site.name, site.home, runtime_ports[site.name], site.device, site.threads,
                                        site.share_local_model)
            self.supernodes[site.name] = self._spawn(command, f"supernode-{site.name}.log",
                                                     {"FLWR_HOME": str(site.home / "flwr")})
        for site in sites:
            process = self.supernodes[site.name]
            try:
                wait_for_port("127.0.0.1", runtime_ports[site.name], process=process)
            except (RuntimeError, TimeoutError):
                continue  # e.g. a refused key: the SuperNode exited; the caller looks at it
            # Only the SuperExec (its ClientApps sign replies) gets the site's signing key.
            self.superexecs[site.name] = self._spawn(
                superexec_command(runtime_ports[site.name], process.pid), f"supernode-{site.name}.log",
                {"FLWR_HOME": str(site.home / "flwr"), **site.environment, "KAAPANA_SITE_KEY": site.key})
        return {site.name: self.supernodes[site.name] for site in sites}

    def site_pids(self, name: str) -> list[int]:
        """Every process of a site: SuperNode, SuperExec and their ClientApps."""
        roots = [p.pid for p in (self.supernodes.get(name), self.superexecs.get(name)) if p is not None]
        return [pid for root in roots for pid in (root, *descendants(root))]

    def stop_site(self, name: str) -> None:
        self.stop_sites([name])

    def stop_sites(self, names: list[str]) -> None:
        """The sites' SuperExecs (and their ClientApps), then their SuperNodes, each set at once."""
        for processes in (self.superexecs, self.supernodes):
            stop_all([p for p in (processes.pop(name, None) for name in names) if p is not None])

    def wait_connected(self, count: int, timeout_s: float = 60.0) -> None:
        """Until `count` SuperNodes are online (`flwr supernode ls`)."""
        deadline = time.monotonic() + timeout_s
        online = 0
        while time.monotonic() < deadline:
            out = subprocess.run([flower_bin("flwr"), "supernode", "ls", CONNECTION, "--format", "json"],
                                 capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "FLWR_HOME": str(self.connection.flwr_home)})
            try:
                nodes = json.loads(out.stdout).get("nodes", [])
                online = sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")
            except ValueError:
                online = 0
            if online >= count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{online} of {count} SuperNodes online after {timeout_s:.0f} s; see {self.folder / 'logs'}")

    def start(self) -> LocalFederation:
        try:
            self.connection.write_config()
            self.start_superlink()
            for site in self.sites:
                self.register(site.name)
            self.start_sites(self.sites)
            self.wait_connected(len(self.sites))
        except BaseException:
            self.close()  # nothing we started outlives a failed start
            raise
        return self

    def close(self) -> None:
        self.stop_sites(list(self.supernodes))
        if self.superlink is not None:
            stop(self.superlink)
            self.superlink = None
