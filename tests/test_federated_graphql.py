"""The graphql transport, for real: two sites, each its own Dagster webserver on loopback
with its own DAGSTER_HOME and KAAPANA_HOME; the hub drives a round through their GraphQL
APIs. Then one site disappears mid-round (its webserver and run are killed) and the round
completes on quorum without it."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from kaapana_assets.federated.assets import federated_plan, federated_rounds
from kaapana_assets.federated.partitions import round_key
from kaapana_assets.lake import Lake
from resources import site_resources
from resources.federation import FederatedSite, FederationResource
from tests.dagster_site import SiteWebserver
from tests.helpers import Federation

# slow tier (`make test-all`): two site webservers, real training rounds over GraphQL
pytestmark = pytest.mark.slow

PAIR = ("site-a", "site-b")


@pytest.fixture
def site_servers(federation: Federation, tmp_path: Path):  # type: ignore[no-untyped-def]
    servers = {}
    try:
        for site in PAIR:
            servers[site] = SiteWebserver(tmp_path / site, {
                "KAAPANA_HOME": str(federation.homes[site].root), "KAAPANA_SITE": site,
                "KAAPANA_SITE_KEY": federation.keys[site], "KAAPANA_EXCHANGE": str(federation.root / "exchange"),
                "KAAPANA_TRAINING_SCHEDULE": "tiny",
            })
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def _kill_when_training(server: SiteWebserver, partition: str, done: threading.Event) -> None:
    """Kill the site (webserver, code server, run) once its site_update run has started."""
    deadline = time.monotonic() + 300
    instance = dg.DagsterInstance.from_config(str(server.dagster_home))
    try:
        while time.monotonic() < deadline and not done.is_set():
            runs = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": partition},
                                                   statuses=[dg.DagsterRunStatus.STARTED]))
            if runs:
                time.sleep(2.0)  # well into training
                os.killpg(server.proc.pid, signal.SIGKILL)
                for run in runs:  # the launched run lives in its own process
                    pid = run.tags.get("dagster/pid")
                    if pid:
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                done.set()
                return
            time.sleep(0.5)
    finally:
        instance.dispose()


@pytest.mark.timeout(1500)
def test_round_through_two_site_webservers(federation: Federation, site_servers) -> None:  # type: ignore[no-untyped-def]
    resource = FederationResource(
        sites=[FederatedSite(name=s, transport="graphql", url=site_servers[s].url, key=federation.keys[s])
               for s in PAIR],
        exchange=str(federation.root / "exchange"), rounds=2, min_sites=1, schedule="tiny",
        local_epochs=1, iterations_per_epoch=6, timeout_s=600, poll_interval_s=1.0,
    )
    hub_root = federation.root / "hub-graphql"
    resources = {**site_resources(hub_root, device="cpu"), "federation": resource}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("federated_experiments", ["remote"])
        dg.materialize([federated_plan], partition_key="remote", instance=instance, resources=resources)
        dg.materialize([federated_plan, federated_rounds], partition_key=round_key("remote", 1), instance=instance,
                       resources=resources, selection=[federated_rounds])
        rows = Lake(hub_root / "lake").read("federated_rounds", pl.col("round") == 1)
        assert set(rows.filter(pl.col("status") == "aggregated")["site"]) == set(PAIR)
        assert rows.filter(pl.col("site") == "global")["dice"][0] is not None
        # Each site ran the jobs on its own instance: fingerprint, update and evaluation.
        for site in PAIR:
            site_instance = dg.DagsterInstance.from_config(str(site_servers[site].dagster_home))
            try:
                runs = site_instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS]))
                assert {r.tags.get("dagster/partition") for r in runs} == {"remote", "remote|1"}
                assert len(runs) == 3
            finally:
                site_instance.dispose()

        # Round 2: site-b disappears while it trains; quorum 1 holds, the round completes.
        done = threading.Event()
        killer = threading.Thread(target=_kill_when_training, args=(site_servers["site-b"], "remote|2", done))
        killer.start()
        result = dg.materialize([federated_plan, federated_rounds], partition_key=round_key("remote", 2),
                                instance=instance, resources=resources, selection=[federated_rounds])
        done.set()
        killer.join()
        assert result.success
        rows = Lake(hub_root / "lake").read("federated_rounds", pl.col("round") == 2)
        status = dict(zip(rows["site"], rows["status"], strict=True))
        assert status == {"site-a": "aggregated", "site-b": "failed", "global": "global"}
        reason = rows.filter(pl.col("site") == "site-b")["message"][0]
        assert "unreachable" in reason or "ended" in reason
