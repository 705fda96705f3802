"""Prometheus and Grafana: the hub's and a site's metrics endpoints (prometheus_client),
Dagster's health figures, a real Prometheus (Debian's package) reading them back, the
scrape config in deploy/ (promtool) and the Grafana dashboard (schema-checked; every
metric it uses is one we export, and every query it runs is valid PromQL)."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import polars as pl
import pyarrow as pa
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from kaapana_assets.cohorts.statistics import compute_statistics, statistics_rows
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import FEDERATED_ROUNDS, NETWORK_SITES, NETWORK_STATISTICS, SITE_STATISTICS
from kaapana_assets.monitoring.exporter import build_registry, dagster_health, serve
from kaapana_assets.monitoring.figures import site_answer
from kaapana_assets.monitoring.metrics import EXPORTED
from kaapana_assets.monitoring.network import Collection, SiteOutcome, collect
from tests import prometheus
from tests.helpers import REPO, SITES, Federation

DASHBOARD = REPO / "deploy" / "grafana-network.json"
SCRAPE_CONFIG = REPO / "deploy" / "prometheus.yml"
UTC = dt.timezone.utc

# The classic Grafana dashboard model (what "Import dashboard" and file provisioning load):
# the fields Grafana requires and the shapes of panels, targets and template variables.
# No JSON schema of it ships offline (Grafana defines it in CUE), so this is a minimal one.
DASHBOARD_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "time", "templating", "editable"],
    "properties": {
        "id": {"type": ["integer", "null"]},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "timezone": {"enum": ["browser", "utc", ""]},
        "editable": {"type": "boolean"},
        "graphTooltip": {"enum": [0, 1, 2]},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "version": {"type": "integer", "minimum": 0},
        "refresh": {"type": "string"},
        "time": {"type": "object", "required": ["from", "to"],
                 "properties": {"from": {"type": "string"}, "to": {"type": "string"}}},
        "annotations": {"type": "object", "properties": {"list": {"type": "array", "items": {"type": "object"}}}},
        "templating": {"type": "object", "required": ["list"],
                       "properties": {"list": {"type": "array", "items": {"$ref": "#/$defs/variable"}}}},
        "panels": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/panel"}},
    },
    "$defs": {
        "gridPos": {"type": "object", "required": ["h", "w", "x", "y"], "properties": {
            "h": {"type": "integer", "minimum": 1}, "w": {"type": "integer", "minimum": 1, "maximum": 24},
            "x": {"type": "integer", "minimum": 0, "maximum": 23}, "y": {"type": "integer", "minimum": 0}}},
        "datasource": {"type": "object", "required": ["type", "uid"],
                       "properties": {"type": {"type": "string"}, "uid": {"type": "string"}}},
        "target": {"type": "object", "required": ["refId", "expr"], "properties": {
            "refId": {"type": "string", "pattern": "^[A-Z]{1,2}$"}, "expr": {"type": "string", "minLength": 1},
            "legendFormat": {"type": "string"}, "instant": {"type": "boolean"},
            "datasource": {"$ref": "#/$defs/datasource"}}},
        "panel": {
            "type": "object", "required": ["id", "type", "title", "gridPos"],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "type": {"enum": ["row", "stat", "timeseries", "table", "bargauge", "barchart", "gauge", "text"]},
                "title": {"type": "string", "minLength": 1}, "description": {"type": "string"},
                "gridPos": {"$ref": "#/$defs/gridPos"}, "datasource": {"$ref": "#/$defs/datasource"},
                "targets": {"type": "array", "items": {"$ref": "#/$defs/target"}},
                "fieldConfig": {"type": "object", "required": ["defaults", "overrides"],
                                "properties": {"defaults": {"type": "object"}, "overrides": {"type": "array"}}},
                "options": {"type": "object"}, "collapsed": {"type": "boolean"}, "panels": {"type": "array"},
            },
            "if": {"properties": {"type": {"const": "row"}}},
            "then": {"required": ["collapsed", "panels"]},
            "else": {"required": ["datasource", "targets", "fieldConfig"],
                     "properties": {"targets": {"minItems": 1}}},
        },
        "variable": {"type": "object", "required": ["name", "type"], "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
            "type": {"enum": ["query", "datasource", "custom", "constant", "interval", "textbox", "adhoc"]},
            "label": {"type": "string"}, "multi": {"type": "boolean"}, "includeAll": {"type": "boolean"}}},
    },
}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    import jsonschema

    dashboard = _dashboard()
    jsonschema.validate(dashboard, DASHBOARD_SCHEMA)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the dashboard"
        covered = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in _panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    for expr in _expressions(dashboard):
        for name in re.findall(r"\$\{?(\w+)", expr):
            assert name in variables, f"{expr!r} uses the undefined variable ${name}"


def test_every_metric_of_the_dashboard_is_exported() -> None:
    used = {name for expr in _expressions(_dashboard()) for name in re.findall(r"\bkaapana_[a-z0-9_]+", expr)}
    assert used and used <= set(EXPORTED), f"not exported: {sorted(used - set(EXPORTED))}"
    # The network view shows what the issue asks for: sites, volumes, quarantine, rounds and Dice, failed runs.
    for name in ("kaapana_network_site_up", "kaapana_network_studies", "kaapana_network_quarantined",
                 "kaapana_federated_round", "kaapana_federated_dice", "kaapana_dagster_failed_runs",
                 "kaapana_dagster_queued_runs", "kaapana_dagster_sensor_tick_age_seconds"):
        assert name in used, name


@pytest.mark.tools("promtool")
def test_the_scrape_config_is_valid() -> None:
    out = subprocess.run(["promtool", "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# -- the endpoints --------------------------------------------------------------------------------

def _instance_with_history(instance: dg.DagsterInstance) -> None:
    """One failed run, one queued run, a sensor that ticked 42 s ago."""
    from dagster._core.remote_origin import (
        RegisteredCodeLocationOrigin,
        RemoteInstigatorOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.scheduler.instigation import (
        InstigatorState,
        InstigatorStatus,
        InstigatorType,
        TickData,
        TickStatus,
    )

    repository = RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("kaapana_assets"), "__repository__")
    instance.add_run(dg.DagsterRun(job_name="network_statistics_job", run_id=str(uuid.uuid4()),
                                   status=dg.DagsterRunStatus.QUEUED,
                                   remote_job_origin=RemoteJobOrigin(repository, "network_statistics_job")))

    @dg.asset
    def broken() -> None:
        raise RuntimeError("fails on purpose")

    dg.materialize([broken], instance=instance, raise_on_error=False)
    state = InstigatorState(RemoteInstigatorOrigin(repository, "incoming_studies"), InstigatorType.SENSOR,
                            InstigatorStatus.RUNNING)
    instance.add_instigator_state(state)
    instance.create_tick(TickData(instigator_origin_id=state.instigator_origin_id, instigator_name="incoming_studies",
                                  instigator_type=InstigatorType.SENSOR, status=TickStatus.SKIPPED,
                                  timestamp=time.time() - 42, selector_id=state.selector_id))


def _write_collection(lake: Lake, collection: Collection) -> None:
    lake.merge(NETWORK_STATISTICS, pa.Table.from_pylist(collection.cell_rows, schema=NETWORK_STATISTICS.schema))
    lake.merge(NETWORK_SITES, pa.Table.from_pylist(collection.site_rows, schema=NETWORK_SITES.schema))


def _hub_lake(federation: Federation, root: Path) -> tuple[Lake, Collection]:
    """A hub table from the three sites' own answers (the functions their ClientApps run),
    site-c stale with figures from two days ago; the transport is test_network_statistics'."""
    now = dt.datetime.now(UTC).replace(microsecond=0)
    answers = {site: site_answer(Lake(federation.homes[site].lake), site, 5, now) for site in SITES}
    old = site_answer(Lake(federation.homes["site-c"].lake), "site-c", 5, now - dt.timedelta(days=2))
    outcomes = [SiteOutcome("site-a", "fresh", answers["site-a"]), SiteOutcome("site-b", "fresh", answers["site-b"]),
                SiteOutcome("site-c", "stale", old, "site_failed", "not connected")]
    lake = Lake(root)
    earlier = collect("1", now - dt.timedelta(hours=1), 5, [SiteOutcome(s, "fresh", a) for s, a in answers.items()])
    _write_collection(lake, earlier)  # an older collection: the endpoint serves the latest only
    collection = collect("2", now, 5, outcomes)
    _write_collection(lake, collection)
    rounds = [{"experiment": "liver-fed", "round": r, "site": site, "status": status, "dice": dice,
               "committed_at": now} for r in (1, 2)
              for site, status, dice in (("site-a", "aggregated", 0.5 + r / 10), ("site-b", "aggregated", 0.4 + r / 10),
                                         ("site-c", "failed" if r == 2 else "aggregated", None if r == 2 else 0.3),
                                         ("global", "global", 0.45 + r / 10))]
    lake.merge(FEDERATED_ROUNDS, pa.Table.from_pylist(rounds, schema=FEDERATED_ROUNDS.schema))
    return lake, collection


def _site_lake(federation: Federation, root: Path) -> Lake:
    """site-a's statistics as its site_statistics asset writes them, in a lake of its own."""
    lake = Lake(root)
    samples = compute_statistics(Lake(federation.homes["site-a"].lake))
    rows = statistics_rows(samples, "site-a", uuid.uuid4().hex, dt.datetime.now(UTC))
    lake.merge(SITE_STATISTICS, pa.Table.from_pylist(rows, schema=SITE_STATISTICS.schema))
    return lake


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def health_instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        _instance_with_history(instance)
        yield instance


def test_dagster_health(health_instance: dg.DagsterInstance) -> None:
    health = dagster_health(health_instance)
    assert health.failed == {"__ephemeral_asset_job__": 1} and health.queued == {"network_statistics_job": 1}
    (sensor,) = health.sensors
    assert sensor.name == "incoming_studies" and sensor.running and time.time() - (sensor.last_tick or 0) >= 42
    assert dagster_health(health_instance, now=time.time() + 2 * 24 * 3600).failed == {}  # outside the window


def test_endpoints_serve_the_tables(federation: Federation, health_instance: dg.DagsterInstance,
                                    tmp_path: Path) -> None:
    hub_lake, collection = _hub_lake(federation, tmp_path / "hub")
    site_lake = _site_lake(federation, tmp_path / "site")
    hub = serve(build_registry("hub", hub_lake, health_instance), "127.0.0.1", 0)
    site = serve(build_registry("site", site_lake), "127.0.0.1", 0)
    for table in ("network_sites", "federated_rounds"):  # a Delta log that cannot be read
        log = tmp_path / "broken" / table / "_delta_log"
        log.mkdir(parents=True)
        (log / f"{0:020d}.json").write_text("not json\n")
    broken = serve(build_registry("hub", Lake(tmp_path / "broken")), "127.0.0.1", 0)
    try:
        scraped, at_site, at_broken = _scrape(hub.server_port), _scrape(site.server_port), _scrape(broken.server_port)
    finally:
        for server in (hub, site, broken):
            server.shutdown()
    assert hub.server_address[0] == "127.0.0.1"
    for row in collection.cell_rows:
        key = (f"kaapana_network_{row['metric']}",
               tuple(sorted({"site": row["site"], "dimension": row["dimension"], "category": row["category"]}.items())))
        assert scraped.get(key) == (float(row["count"]) if row["count"] is not None else None), key
    assert scraped[("kaapana_network_site_up", (("site", "site-c"),))] == 0.0
    assert scraped[("kaapana_network_sites", (("status", "stale"),))] == 1.0
    figures_at = collection.outcome("site-c").answer.computed_at  # type: ignore[union-attr]
    assert scraped[("kaapana_network_site_figures_timestamp_seconds", (("site", "site-c"),))] == figures_at.timestamp()
    assert scraped[("kaapana_dagster_failed_runs", (("dagster_job", "__ephemeral_asset_job__"),))] == 1.0
    assert scraped[("kaapana_dagster_queued_runs", (("dagster_job", "network_statistics_job"),))] == 1.0
    assert scraped[("kaapana_dagster_sensor_tick_age_seconds", (("sensor", "incoming_studies"),))] >= 42
    assert scraped[("kaapana_exporter_source_up", (("source", "network"),))] == 1.0
    # The site serves what its textfile holds (the same samples).
    samples = compute_statistics(Lake(federation.homes["site-a"].lake))
    for sample in samples:
        assert at_site[(sample.metric, tuple(sorted({"site": "site-a", **sample.labels}.items())))] == sample.value
    # An unreadable source is reported; the endpoint still answers.
    assert at_broken[("kaapana_exporter_source_up", (("source", "network"),))] == 0.0
    assert at_broken[("kaapana_exporter_source_up", (("source", "federated"),))] == 0.0


@pytest.mark.slow
@pytest.mark.tools("prometheus")
def test_a_real_prometheus_reads_back_what_the_tables_hold(federation: Federation,
                                                           health_instance: dg.DagsterInstance,
                                                           tmp_path: Path) -> None:
    """Debian's Prometheus, on loopback, scrapes the hub's and a site's endpoints; the values
    read back through its query API are the Delta tables' and Dagster's; every query of the
    Grafana dashboard is valid PromQL against it."""
    hub_lake, _ = _hub_lake(federation, tmp_path / "hub")
    site_lake = _site_lake(federation, tmp_path / "site")
    hub = serve(build_registry("hub", hub_lake, health_instance), "127.0.0.1", 0)
    site = serve(build_registry("site", site_lake), "127.0.0.1", 0)
    try:
        with prometheus.running_prometheus(tmp_path / "prometheus", {"hub": [f"127.0.0.1:{hub.server_port}"],
                                                                     "site": [f"127.0.0.1:{site.server_port}"]}) as url:
            prometheus.wait_for_scrape(url, "hub")
            prometheus.wait_for_scrape(url, "site")
            network = prometheus.values(url, '{__name__=~"kaapana_network_.*", job="hub"}')
            health = prometheus.values(url, '{__name__=~"kaapana_dagster_.*", job="hub"}')
            federated = prometheus.values(url, '{__name__=~"kaapana_federated_.*", job="hub"}')
            at_site = prometheus.values(url, '{__name__=~"kaapana_dicom_.*|kaapana_cohort_.*|kaapana_project_.*", job="site"}')
            dashboard = {expr: prometheus.query(url, re.sub(r"\$site", ".*", expr))
                         for expr in _expressions(_dashboard()) if not expr.startswith("label_values")}
    finally:
        hub.shutdown()
        site.shutdown()

    for labels in [*network, *health, *federated, *at_site]:  # no label of ours clashes with a target label
        assert not any(name.startswith("exported_") for name, _ in labels), labels
    latest = hub_lake.read(NETWORK_STATISTICS, pl.col("snapshot_id") == "2")
    expected = {tuple(sorted({"__name__": f"kaapana_network_{r['metric']}", "site": r["site"],
                              "dimension": r["dimension"], "category": r["category"]}.items())): float(r["count"])
                for r in latest.iter_rows(named=True) if r["count"] is not None}
    assert expected and {k: v for k, v in network.items() if k in expected} == expected
    sites = hub_lake.read(NETWORK_SITES, pl.col("snapshot_id") == "2")
    for row in sites.iter_rows(named=True):
        up = network[(("__name__", "kaapana_network_site_up"), ("site", row["site"]))]
        assert up == (1.0 if row["status"] == "fresh" else 0.0)
        assert network[(("__name__", "kaapana_network_site_figures_timestamp_seconds"), ("site", row["site"]))] \
            == row["figures_at"].timestamp()
    assert health[(("__name__", "kaapana_dagster_failed_runs"), ("dagster_job", "__ephemeral_asset_job__"))] == 1.0
    assert health[(("__name__", "kaapana_dagster_queued_runs"), ("dagster_job", "network_statistics_job"))] == 1.0
    assert health[(("__name__", "kaapana_dagster_sensor_tick_age_seconds"), ("sensor", "incoming_studies"))] >= 42
    statistics = Lake(site_lake.root).read(SITE_STATISTICS)
    for row in statistics.iter_rows(named=True):
        key = tuple(sorted({"__name__": row["metric"], "site": "site-a", **json.loads(row["labels"])}.items()))
        assert at_site[key] == row["value"]
    assert health[(("__name__", "kaapana_dagster_sensor_running"), ("sensor", "incoming_studies"))] == 1.0
    rounds = hub_lake.read(FEDERATED_ROUNDS, pl.col("round") == 2)
    assert federated[(("__name__", "kaapana_federated_round"), ("experiment", "liver-fed"))] == 2.0
    assert {dict(k)["site"]: v for k, v in federated.items() if dict(k)["__name__"] == "kaapana_federated_dice"} \
        == {r["site"]: r["dice"] for r in rounds.iter_rows(named=True) if r["dice"] is not None}
    assert {dict(k)["status"]: v for k, v in federated.items()
            if dict(k)["__name__"] == "kaapana_federated_round_sites"} == {"aggregated": 2.0, "failed": 1.0}
    # Every dashboard query is valid PromQL (query() raises otherwise). Empty come back only
    # figures these sites suppress (four patients each: patients, studies and series by
    # modality are all below 5) or do not have (no quarantined file, no run in progress).
    empty = {expr for expr, result in dashboard.items() if not result}
    assert empty <= {'kaapana_network_patients{dimension="all", site=~"$site"}',
                     'kaapana_network_studies{dimension="all", site=~"$site"}',
                     'kaapana_network_series{dimension="modality", site="network"}',
                     'kaapana_network_quarantined{dimension="reason", site="network"}',
                     'sum by (dagster_job) (kaapana_dagster_in_progress_runs)'}, empty
