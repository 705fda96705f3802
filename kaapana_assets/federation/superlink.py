"""The Flower processes of a federation: their command lines, and the registration of a
site's SuperNode key at the SuperLink.

Hub: one SuperLink (Fleet, Control and runtime APIs on one HTTPS port; TLS with the hub's
certificate; SuperNode authentication on; runtime dependency installation off).
Site: one SuperNode that dials out to that port and polls; it authenticates with the
site's own EC key pair, whose public key the hub registered. Beside it, the site's
SuperExec (`kaapana-superexec`, warm_superexec.py) starts a ClientApp process per
message. A site opens no port to the outside (the SuperNode's runtime API, for its own
SuperExec and ClientApps, listens on 127.0.0.1 only).

The credentials are made by credentials.py; local.py starts these processes on loopback
(the demo and the tests, the same processes and flags as in production).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from kaapana_assets.federation.runs import CONNECTION, Connection

# Message TTL and the wait for a phase's replies: a full nnU-Net round runs for hours.
DEFAULT_TTL_S = 24 * 3600.0
DEFAULT_ROUND_TIMEOUT_S = 12 * 3600.0


def flower_bin(name: str) -> str:
    """A command installed beside this interpreter (Flower's, and kaapana-superexec)."""
    return str(Path(sys.executable).with_name(name))


# -- command lines ------------------------------------------------------------------------------

# Flower's name for its in-memory LinkState (flwr.supercore.constant.FLWR_IN_MEMORY_DB_NAME;
# spelled here so that the code location does not import flwr, and checked by a test).
IN_MEMORY_STATE = ":flwr-in-memory:"


def superlink_command(certificates: Mapping[str, Path], host: str, port: int, database: Path | None) -> list[str]:
    """`database`: the SuperLink's SQLite state; None keeps it in memory (a SuperLink that
    lives only as long as its federation, as the local harness's)."""
    return [flower_bin("flower-superlink"), "--ssl-ca-certfile", str(certificates["ca"]),
            "--ssl-certfile", str(certificates["certificate"]), "--ssl-keyfile", str(certificates["key"]),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", host, "--port", str(port),
            "--database", IN_MEMORY_STATE if database is None else str(database)]


def supernode_command(superlink: str, root_certificate: Path, private_key: Path, site: str, home: Path,
                      runtime_port: int = 9094, device: str = "auto", threads: int = 2,
                      share_local_model: bool = False) -> list[str]:
    """The site's SuperNode. `--isolation process`: its ClientApps are started by the
    site's `kaapana-superexec` (superexec_command), not by a SuperExec of Flower's own.
    `share_local_model`: the site's consent to cross-site evaluation (clientapp.py)."""
    node_config = f'kaapana-home="{home}" site="{site}" device="{device}" threads={threads}' + (
        ' share-local-model="true"' if share_local_model else "")
    return [flower_bin("flower-supernode"), "--superlink", superlink, "--root-certificates", str(root_certificate),
            "--auth-supernode-private-key", str(private_key), "--node-config", node_config,
            "--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime_port)]


def superexec_command(runtime_port: int = 9094, parent_pid: int | None = None) -> list[str]:
    """The site's SuperExec beside its SuperNode: Flower's, with ClientApps forked from a
    process that has the site's stack imported (federation/warm_superexec.py). It talks to
    the SuperNode's runtime API on loopback only, as Flower's own would."""
    return [flower_bin("kaapana-superexec"), "--insecure", "--runtime-api-address", f"127.0.0.1:{runtime_port}",
            *(["--parent-pid", str(parent_pid)] if parent_pid is not None else [])]


def register_node(connection: Connection, public_key: Path) -> str:
    """Register a site's public key at the SuperLink (`flwr supernode register`); returns
    Flower's answer. Only registered keys may connect."""
    connection.write_config()
    out = subprocess.run([flower_bin("flwr"), "supernode", "register", str(public_key), CONNECTION],
                         capture_output=True, text=True, env={**os.environ, "FLWR_HOME": str(connection.flwr_home)},
                         timeout=120)
    if out.returncode != 0 or "registered successfully" not in out.stdout:
        raise RuntimeError(f"could not register {public_key.name}: {(out.stdout + out.stderr).strip()[-500:]}")
    return out.stdout.strip().splitlines()[-1]
