"""What the hub and each site serve to Prometheus (prometheus_client collectors that read
the Delta tables at every scrape, so the endpoint always shows what the tables hold).

Hub: the latest collection of `network_statistics` / `network_sites` (every site's cells,
the network total as site "network", which sites are fresh or stale), the federated rounds
(latest round and Dice per experiment), and Dagster's health. Site: the latest snapshot of
`site_statistics` (the same figures as its textfile) and its Dagster's health. A source that
cannot be read shows as `kaapana_exporter_source_up{source} 0`; the others are still served.

`EXPORTED` names every metric we export: the Grafana dashboard may use only these.

Plain module (prometheus_client, polars): no Dagster. The Dagster figures come in as
`Health` (read from an instance by exporter.py).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import polars as pl
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from kaapana_assets.cohorts.statistics import LABELS as SITE_LABELS
from kaapana_assets.cohorts.statistics import METRICS as SITE_METRICS
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import FEDERATED_ROUNDS, NETWORK_SITES, NETWORK_STATISTICS, SITE_STATISTICS
from kaapana_assets.monitoring.figures import METRICS
from kaapana_assets.monitoring.network import FRESH, STALE, UNAVAILABLE

log = logging.getLogger(__name__)

CELL_LABELS = ("site", "dimension", "category")
NETWORK_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{f"kaapana_network_{m}": (f"{m.replace('_', ' ').capitalize()} per site and in the network (site=\"network\"), "
                                "by dimension and category; suppressed cells are absent, and so is a network "
                                "total that a site withheld a part of", CELL_LABELS) for m in METRICS},
    "kaapana_network_suppressed_sites": ("Sites that withheld a cell of the network total (each at least 1)",
                                         ("metric", "dimension", "category")),
    "kaapana_network_site_up": ("1 when the site answered the latest collection, 0 when its figures are stale "
                                "or unavailable", ("site",)),
    "kaapana_network_site_figures_timestamp_seconds": ("When the site computed the figures reported for it",
                                                       ("site",)),
    "kaapana_network_site_last_ingest_timestamp_seconds": ("The site's last ingest (to the minute)", ("site",)),
    "kaapana_network_site_suppressed_cells": ("Cells the site withheld (small-cell suppression)", ("site",)),
    "kaapana_network_sites": ("Sites of the federation by status in the latest collection", ("status",)),
    "kaapana_network_collection_timestamp_seconds": ("When the hub collected the latest figures", ()),
}
FEDERATED_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kaapana_federated_round": ("Latest completed round of each federated experiment", ("experiment",)),
    "kaapana_federated_dice": ("Dice of the latest round's global model on each site's validation patients "
                               "(site=\"global\": across the sites)", ("experiment", "site")),
    "kaapana_federated_round_sites": ("Sites of the latest round by status (aggregated, rejected, failed)",
                                      ("experiment", "status")),
}
HEALTH_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    # `dagster_job`, not `job`: Prometheus' own target label is `job`.
    "kaapana_dagster_failed_runs": ("Runs that failed within the exporter's window (default 24 h), per job",
                                    ("dagster_job",)),
    "kaapana_dagster_queued_runs": ("Runs queued now, per job", ("dagster_job",)),
    "kaapana_dagster_in_progress_runs": ("Runs starting or started now, per job", ("dagster_job",)),
    "kaapana_dagster_sensor_tick_age_seconds": ("Seconds since the sensor's latest tick", ("sensor",)),
    "kaapana_dagster_sensor_running": ("1 when the sensor is running", ("sensor",)),
}
EXPORTER_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kaapana_exporter_source_up": ("1 when the exporter could read the source at this scrape", ("source",)),
}
SITE_STATISTICS_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    name: (help_text, ("site", *SITE_LABELS.get(name, ()))) for name, help_text in SITE_METRICS.items()
}
EXPORTED: dict[str, tuple[str, tuple[str, ...]]] = {
    **NETWORK_METRICS, **FEDERATED_METRICS, **HEALTH_METRICS, **EXPORTER_METRICS, **SITE_STATISTICS_METRICS,
}


def _families(spec: Mapping[str, tuple[str, tuple[str, ...]]]) -> dict[str, GaugeMetricFamily]:
    return {name: GaugeMetricFamily(name, help_text, labels=list(labels)) for name, (help_text, labels) in spec.items()}


def _seconds(value: object) -> float | None:
    return value.timestamp() if isinstance(value, dt.datetime) else None


# -- hub: the network ---------------------------------------------------------------------------

def latest_collection(lake: Lake) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(network_sites rows, network_statistics rows) of the latest collection of whole sites
    (a research project's collections are the asset's to show); empty frames when there was none."""
    sites = lake.read(NETWORK_SITES)
    if "project" in sites.columns:  # tables written before projects have no such column
        sites = sites.filter(pl.col("project").is_null())
    if not sites.height:
        return sites, lake.read(NETWORK_STATISTICS).clear()
    snapshot = sites.sort("collected_at")["snapshot_id"][-1]
    return (sites.filter(pl.col("snapshot_id") == snapshot),
            lake.read(NETWORK_STATISTICS, pl.col("snapshot_id") == snapshot))


def network_families(lake: Lake) -> list[GaugeMetricFamily]:
    families = _families(NETWORK_METRICS)
    sites, cells = latest_collection(lake)
    for row in cells.iter_rows(named=True):
        if row["count"] is not None:
            families[f"kaapana_network_{row['metric']}"].add_metric(
                [row["site"], row["dimension"], row["category"]], float(row["count"]))
        if row["suppressed_sites"]:
            families["kaapana_network_suppressed_sites"].add_metric(
                [row["metric"], row["dimension"], row["category"]], float(row["suppressed_sites"]))
    statuses: Counter[str] = Counter()
    for row in sites.iter_rows(named=True):
        statuses[row["status"]] += 1
        families["kaapana_network_site_up"].add_metric([row["site"]], 1.0 if row["status"] == FRESH else 0.0)
        for name, value in (("kaapana_network_site_figures_timestamp_seconds", _seconds(row["figures_at"])),
                            ("kaapana_network_site_last_ingest_timestamp_seconds", _seconds(row["last_ingest_at"]))):
            if value is not None:
                families[name].add_metric([row["site"]], value)
        families["kaapana_network_site_suppressed_cells"].add_metric([row["site"]], float(row["suppressed_cells"] or 0))
    if sites.height:
        for status in (FRESH, STALE, UNAVAILABLE):
            families["kaapana_network_sites"].add_metric([status], float(statuses[status]))
        collected = _seconds(sites["collected_at"][0])
        if collected is not None:
            families["kaapana_network_collection_timestamp_seconds"].add_metric([], collected)
    return list(families.values())


def federated_families(lake: Lake) -> list[GaugeMetricFamily]:
    families = _families(FEDERATED_METRICS)
    rounds = lake.read(FEDERATED_ROUNDS)
    done = rounds.filter(pl.col("status") == "global")
    for experiment, latest in done.group_by("experiment").agg(pl.col("round").max()).sort("experiment").iter_rows():
        families["kaapana_federated_round"].add_metric([experiment], float(latest))
        rows = rounds.filter((pl.col("experiment") == experiment) & (pl.col("round") == latest))
        for row in rows.iter_rows(named=True):
            if row["dice"] is not None:
                families["kaapana_federated_dice"].add_metric([experiment, row["site"]], float(row["dice"]))
        sites = rows.filter(pl.col("status") != "global").group_by("status").len()
        for status, count in sites.sort("status").iter_rows():
            families["kaapana_federated_round_sites"].add_metric([experiment, status], float(count))
    return list(families.values())


# -- site: its own statistics --------------------------------------------------------------------

def site_statistics_families(lake: Lake) -> list[GaugeMetricFamily]:
    """The latest snapshot of the site's `site_statistics` (what its textfile holds)."""
    families = _families(SITE_STATISTICS_METRICS)
    table = lake.read(SITE_STATISTICS)
    if table.height:
        snapshot = table.sort("computed_at")["snapshot_id"][-1]
        for row in table.filter(pl.col("snapshot_id") == snapshot).iter_rows(named=True):
            if row["metric"] not in families:
                continue
            labels = json.loads(row["labels"] or "{}")
            names = SITE_STATISTICS_METRICS[row["metric"]][1]
            families[row["metric"]].add_metric([row["site"], *(str(labels.get(n, "")) for n in names[1:])],
                                               float(row["value"]))
    return list(families.values())


# -- Dagster's health ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SensorHealth:
    name: str
    running: bool
    last_tick: float | None  # seconds since the epoch


@dataclass(frozen=True)
class Health:
    failed: Mapping[str, int] = field(default_factory=dict)  # job -> runs failed within the window
    queued: Mapping[str, int] = field(default_factory=dict)
    in_progress: Mapping[str, int] = field(default_factory=dict)
    sensors: tuple[SensorHealth, ...] = ()


def health_families(health: Health, now: float | None = None) -> list[GaugeMetricFamily]:
    now = time.time() if now is None else now
    families = _families(HEALTH_METRICS)
    for name, counts in (("kaapana_dagster_failed_runs", health.failed), ("kaapana_dagster_queued_runs", health.queued),
                         ("kaapana_dagster_in_progress_runs", health.in_progress)):
        for job, count in sorted(counts.items()):
            families[name].add_metric([job], float(count))
    for sensor in sorted(health.sensors, key=lambda s: s.name):
        families["kaapana_dagster_sensor_running"].add_metric([sensor.name], 1.0 if sensor.running else 0.0)
        if sensor.last_tick is not None:
            families["kaapana_dagster_sensor_tick_age_seconds"].add_metric([sensor.name],
                                                                           max(0.0, now - sensor.last_tick))
    return list(families.values())


# -- collectors ---------------------------------------------------------------------------------

Source = Callable[[], list[GaugeMetricFamily]]


class KaapanaCollector(Collector):
    """Reads every source at each scrape; a source that fails is reported, not fatal."""

    def __init__(self, sources: Mapping[str, Source]):
        self.sources = dict(sources)

    def collect(self) -> Iterator[Metric]:
        up = _families(EXPORTER_METRICS)["kaapana_exporter_source_up"]
        for name, source in self.sources.items():
            try:
                families = source()
            except Exception:  # noqa: BLE001 - one unreadable source must not take the endpoint down
                log.exception("metrics source %s failed", name)
                families, ok = [], 0.0
            else:
                ok = 1.0
            yield from families
            up.add_metric([name], ok)
        yield up


def hub_sources(lake: Lake, health: Callable[[], Health] | None = None) -> dict[str, Source]:
    sources: dict[str, Source] = {"network": lambda: network_families(lake),
                                  "federated": lambda: federated_families(lake)}
    if health is not None:
        sources["dagster"] = lambda: health_families(health())
    return sources


def site_sources(lake: Lake, health: Callable[[], Health] | None = None) -> dict[str, Source]:
    sources: dict[str, Source] = {"site_statistics": lambda: site_statistics_families(lake)}
    if health is not None:
        sources["dagster"] = lambda: health_families(health())
    return sources


def registry(sources: Mapping[str, Source]) -> CollectorRegistry:
    """A registry of our own (not prometheus_client's global one, which holds process metrics)."""
    registry = CollectorRegistry()
    registry.register(KaapanaCollector(sources))
    return registry
