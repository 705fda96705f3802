"""The metrics endpoint: a small process beside the code location that serves the hub's or
a site's figures to Prometheus over HTTP (prometheus_client), read from the Delta tables
and the Dagster instance at every scrape.

    python -m kaapana_assets.monitoring.exporter --role hub  --home /data/kaapana --port 9464
    python -m kaapana_assets.monitoring.exporter --role site --home /data/kaapana --port 9464

Like flower_apps.py and the CLI, this is an entry point, not a domain module: it is the one
place of the monitoring domain that reads Dagster (its instance's runs and sensor ticks).
It listens on 127.0.0.1 unless told otherwise (`--host 0.0.0.0` in a pod). A site's
endpoint is for the site's own Prometheus: the hub never connects to a site, it receives
the sites' figures over the federation channel (`network_statistics`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.registry import CollectorRegistry

from kaapana_assets.lake import Lake
from kaapana_assets.monitoring.metrics import Health, SensorHealth, hub_sources, registry, site_sources

if TYPE_CHECKING:
    from dagster import DagsterInstance

DEFAULT_PORT = 9464
DEFAULT_FAILED_WINDOW_S = 24 * 3600.0
RUN_RECORD_LIMIT = 10_000  # per status and scrape


def dagster_health(instance: DagsterInstance, failed_window_s: float = DEFAULT_FAILED_WINDOW_S,
                   now: float | None = None) -> Health:
    """Failed (within the window), queued and in-progress runs per job, and every sensor's
    latest tick, from a Dagster instance."""
    from dagster import DagsterRunStatus, RunsFilter
    from dagster._core.scheduler.instigation import InstigatorType

    now = time.time() if now is None else now

    def per_job(statuses: list[DagsterRunStatus], since: float | None = None) -> dict[str, int]:
        after = dt.datetime.fromtimestamp(since, dt.timezone.utc) if since is not None else None
        records = instance.get_run_records(RunsFilter(statuses=statuses, updated_after=after), limit=RUN_RECORD_LIMIT)
        return dict(Counter(record.dagster_run.job_name for record in records))

    sensors = []
    for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1)
        sensors.append(SensorHealth(state.instigator_name, state.is_running, ticks[0].timestamp if ticks else None))
    return Health(
        failed=per_job([DagsterRunStatus.FAILURE], now - failed_window_s),
        queued=per_job([DagsterRunStatus.QUEUED]),
        in_progress=per_job([DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]),
        sensors=tuple(sensors),
    )


def build_registry(role: str, lake: Lake, instance: DagsterInstance | None = None,
                   failed_window_s: float = DEFAULT_FAILED_WINDOW_S) -> CollectorRegistry:
    health: Callable[[], Health] | None = None
    if instance is not None:
        health = lambda: dagster_health(instance, failed_window_s)  # noqa: E731
    if role == "hub":
        return registry(hub_sources(lake, health))
    if role == "site":
        return registry(site_sources(lake, health))
    raise ValueError(f"role must be 'hub' or 'site', not {role!r}")


def serve(metrics: CollectorRegistry, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> WSGIServer:
    """Serve /metrics on host:port in a daemon thread; `server.shutdown()` stops it."""
    server, _ = start_http_server(port, addr=host, registry=metrics)
    return server


def _instance(dagster_home: str | None) -> Any:
    from dagster import DagsterInstance

    if dagster_home:
        return DagsterInstance.from_config(str(Path(dagster_home).resolve()))
    try:
        return DagsterInstance.get()  # $DAGSTER_HOME, as Dagster itself reads it
    except Exception as exc:  # noqa: BLE001 - no instance configured: serve the tables alone
        print(f"no Dagster instance ({exc}); serving without Dagster's health", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    from kaapana_assets.environment import Environment

    parser = argparse.ArgumentParser(prog="python -m kaapana_assets.monitoring.exporter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=("hub", "site"), required=True)
    parser.add_argument("--home", type=Path, help="KAAPANA_HOME (default: $KAAPANA_HOME)")
    parser.add_argument("--lake", help="the lake's URI (default: $KAAPANA_LAKE_URI or <home>/lake)")
    parser.add_argument("--dagster-home", help="the Dagster instance's folder (default: $DAGSTER_HOME)")
    parser.add_argument("--no-dagster", action="store_true", help="serve the tables without Dagster's health")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--failed-window-hours", type=float, default=DEFAULT_FAILED_WINDOW_S / 3600)
    args = parser.parse_args(argv)

    environment = Environment.read(home=args.home)
    lake = Lake(args.lake, environment.s3_storage_options if "://" in args.lake else None) if args.lake \
        else Lake.of(environment)
    instance = None if args.no_dagster else _instance(args.dagster_home)
    server = serve(build_registry(args.role, lake, instance, args.failed_window_hours * 3600), args.host, args.port)
    print(f"kaapana {args.role} metrics on http://{args.host}:{server.server_port}/metrics", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    if instance is not None:
        instance.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
