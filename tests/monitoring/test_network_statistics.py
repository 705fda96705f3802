"""Network monitoring at the hub: every site's aggregates over the real federation channel
(a SuperLink and three SuperNodes on loopback), small cells suppressed at the site, merged
into one Delta table with a network total; a site taken down is stale with its last known
figures; no identifier in any answer; a real Prometheus reads back what the table holds.
The fast tests check suppression, the hub's checks, the site's handler and the merge on
hand-made data."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from kaapana_assets.federation.channel import CONFIG, Kind, seal, verify
from kaapana_assets.federation.guard import leaked_identifiers, site_identifiers
from kaapana_assets.federation.keys import generate_site_key
from kaapana_assets.federation.local import LocalFederation
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import (
    INSTANCES,
    NETWORK_SITES,
    NETWORK_STATISTICS,
    SERIES,
)
from kaapana_assets.monitoring.assets import network_statistics
from kaapana_assets.monitoring.exporter import build_registry, serve
from kaapana_assets.monitoring.figures import (
    EXPERIMENT,
    AnswerRefused,
    SiteAnswer,
    compute_figures,
    parse_answer,
    site_answer,
    suppress,
)
from kaapana_assets.monitoring.network import NETWORK, SiteOutcome, collect, pivot
from kaapana_assets.projects.assignment import Arrived, AssignedBy, assign_ingested
from kaapana_assets.projects.catalog import create_project
from resources.storage import LakeResource
from tests import prometheus
from tests.helpers import SITES, Federation, make_site_lake, merge_rows

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_site_figures_and_suppression(tmp_path: Path) -> None:
    lake = make_site_lake(tmp_path / "lake")
    figures = compute_figures(lake)
    cells = figures.cells
    assert cells[("patients", "all", "all")] == 7 and cells[("studies", "all", "all")] == 7
    assert cells[("series", "all", "all")] == 7 and cells[("instances", "all", "all")] == 70
    assert cells[("patients", "sex", "F")] == 5 and cells[("patients", "sex", "M")] == 2
    assert cells[("patients", "age", "60-69")] == 5 and cells[("patients", "age", "70-79")] == 2
    assert cells[("series", "slice_thickness", "2-3")] == 6 and cells[("series", "slice_thickness", "0-1")] == 1
    assert cells[("instances", "manufacturer", "GE")] == 60 and cells[("series", "manufacturer", "Philips")] == 1
    assert cells[("quarantined", "reason", "not_dicom")] == 6 and cells[("quarantined", "reason", "truncated")] == 1
    assert cells[("cohort_series", "cohort", "c1")] == 6 and cells[("cohort_patients", "cohort", "c1")] == 6
    assert figures.last_ingest_at == dt.datetime(2026, 2, 27, 8, 30, tzinfo=UTC)  # to the minute

    reported = suppress(cells, 5)
    # Counts 1-4 leave as "<5"; 0 and counts of 5 or more in the clear.
    assert reported[("patients", "all", "all")] == 7 and reported[("patients", "sex", "O")] == 0
    assert reported[("patients", "sex", "M")] == "<5" and reported[("series", "manufacturer", "Philips")] == "<5"
    assert reported[("quarantined", "reason", "truncated")] == "<5"
    # Complementary: the total is published, so the other cell of the partition is withheld too.
    assert reported[("patients", "sex", "F")] == ">=5" and reported[("patients", "age", "60-69")] == ">=5"
    assert reported[("series", "manufacturer", "GE")] == ">=5" and reported[("quarantined", "reason", "not_dicom")] == ">=5"
    assert reported[("series", "slice_thickness", "2-3")] == ">=5"
    # No small cell in that partition: nothing withheld.
    assert reported[("instances", "manufacturer", "GE")] == 60 and reported[("instances", "manufacturer", "Philips")] == 10
    assert reported[("cohort_series", "cohort", "c1")] == 6  # not a partition: no complement needed

    assert all(isinstance(v, int) for v in suppress(cells, 1).values())  # threshold 1: nothing to suppress
    strict = suppress(cells, 8)  # the threshold is the hub's to choose
    assert strict[("patients", "all", "all")] == "<8" and strict[("instances", "all", "all")] == 70


def test_the_hub_refuses_small_cells_in_the_clear(tmp_path: Path) -> None:
    answer = site_answer(make_site_lake(tmp_path / "lake"), "site-x", 5, NOW)
    assert parse_answer(answer.dumps(), "site-x", 5) == answer
    leaky = answer.to_json()
    leaky["cells"] = [[*c[:3], 2] if c[:3] == ["patients", "sex", "M"] else c for c in leaky["cells"]]
    with pytest.raises(AnswerRefused, match="small count in the clear"):
        parse_answer(leaky, "site-x", 5)
    with pytest.raises(AnswerRefused, match="claims site"):
        parse_answer(answer.dumps(), "site-y", 5)
    with pytest.raises(AnswerRefused, match="asked for at least 10"):  # suppressed with less than asked
        parse_answer(answer.dumps(), "site-x", 10)
    for bad in ({**answer.to_json(), "cells": [["patients", "all", "all", True]]},
                {**answer.to_json(), "cells": [["patient_names", "all", "all", 7]]},
                {**answer.to_json(), "cells": [["patients", "all", "a\nb", 7]]},
                {**answer.to_json(), "cells": [["patients", "all", "all", 7]] * 2},
                {**answer.to_json(), "computed_at": "yesterday"}):
        with pytest.raises(AnswerRefused):
            parse_answer(bad, "site-x", 5)




def _request(key: str, threshold: object, kind: Kind = Kind.STATISTICS_REQUEST, round_: int = 42,
             project: str | None = None) -> Message:
    body = {"threshold": threshold, **({"project": project} if project is not None else {})}
    content = RecordDict({CONFIG: ConfigRecord({"request": json.dumps(body)})})
    return Message(seal(content, kind, EXPERIMENT, round_, "site-x", 0, key), 1, "query")


def test_the_site_handler_suppresses_signs_and_keeps_its_floor(tmp_path: Path, flower_run: None) -> None:
    from kaapana_assets.federation.clientapp import SiteSettings
    from kaapana_assets.monitoring.steps import statistics

    make_site_lake(tmp_path / "home" / "lake")
    key = generate_site_key()
    settings = SiteSettings("site-x", tmp_path / "home", key)
    reply = statistics(settings, _request(key, 5))
    manifest = verify(reply.content, key, Kind.STATISTICS, EXPERIMENT, 42, "site-x")
    assert manifest.cases == 0  # no count outside the suppressed cells
    answer = parse_answer(str(reply.content[CONFIG]["statistics"]), "site-x", 5)
    assert answer.threshold == 5 and answer.cells[("patients", "sex", "M")] == "<5"

    floor = SiteSettings("site-x", tmp_path / "home", key, min_cell_size=10)
    lowered = parse_answer(str(statistics(floor, _request(key, 3)).content[CONFIG]["statistics"]), "site-x", 3)
    assert lowered.threshold == 10 and lowered.cells[("patients", "all", "all")] == "<10"  # the site's floor holds

    with pytest.raises(RuntimeError, match="refuses the hub's statistics request"):
        statistics(settings, _request(generate_site_key(), 5))  # not signed with this site's key
    with pytest.raises(RuntimeError, match="refuses the hub's statistics request"):
        statistics(settings, _request(key, 5, kind=Kind.FINGERPRINT_REQUEST))  # another kind of message
    with pytest.raises(RuntimeError, match="threshold"):
        statistics(settings, _request(key, 0))


def test_a_free_text_identifier_is_caught_by_the_guard(tmp_path: Path) -> None:
    """Categories are DICOM free text: if a manufacturer field held a patient ID, the answer
    would carry it, and the ClientApp's identifier guard refuses to send it."""
    lake = make_site_lake(tmp_path / "lake")
    merge_rows(lake, SERIES, [{"series_uid": "9.9.9", "study_uid": "1.2.3.0", "patient_id": "PAT-0000",
                             "modality": "CT", "manufacturer": "PAT-0000", "instance_count": 1}])
    answer = site_answer(lake, "site-x", 5)
    assert leaked_identifiers(answer.dumps().encode(), site_identifiers(lake)) == ["PAT-0000"]


def _answer(site: str, cells: dict, at: dt.datetime = NOW) -> SiteAnswer:
    return SiteAnswer(site, at, 5, at - dt.timedelta(hours=1), cells)


def test_a_projects_figures_count_its_series_only(tmp_path: Path, flower_run: None) -> None:
    """Statistics of one research project: only its series, studies, patients and cohorts, asked
    by the hub, answered and checked for that project, remembered apart from whole sites."""
    from kaapana_assets.federation.clientapp import SiteSettings
    from kaapana_assets.federation.store import FederationStore
    from kaapana_assets.monitoring.network import last_known, remember
    from kaapana_assets.monitoring.steps import statistics

    lake = make_site_lake(tmp_path / "home" / "lake")
    create_project(lake, "lung", "Lung nodules")
    assign_ingested(lake, [Arrived(f"1.2.3.{i}.1", f"1.2.3.{i}", "lung", AssignedBy.CALLED_AE) for i in range(3)])
    whole, lung = compute_figures(lake).cells, compute_figures(lake, "lung").cells
    assert (whole[("series", "all", "all")], whole[("quarantined", "all", "all")]) == (7, 7)
    assert [lung[(metric, "all", "all")] for metric in ("patients", "studies", "series", "instances", "quarantined")] \
        == [3, 3, 3, 30, 0]
    assert ("cohort_series", "cohort", "c1") in whole and ("cohort_series", "cohort", "c1") not in lung
    assert compute_figures(lake, "liver").cells[("series", "all", "all")] == 0  # no such project here

    key = generate_site_key()
    settings = SiteSettings("site-x", tmp_path / "home", key, min_cell_size=1)  # a site without a floor of its own
    reply = statistics(settings, _request(key, 2, project="lung"))
    answer = parse_answer(str(reply.content[CONFIG]["statistics"]), "site-x", 2, "lung")
    assert answer.project == "lung" and answer.cells[("series", "all", "all")] == 3
    with pytest.raises(AnswerRefused, match="counts project 'lung', the hub asked for None"):
        parse_answer(str(reply.content[CONFIG]["statistics"]), "site-x", 2)
    with pytest.raises(RuntimeError, match="refuses a statistics request for project 'Lung Nodules'"):
        statistics(settings, _request(key, 2, project="Lung Nodules"))

    store = FederationStore(tmp_path / "hub")
    remember(store, {"site-x": answer})
    assert last_known(store, "site-x", "lung") == answer and last_known(store, "site-x") is None
    rows = collect("1", NOW, 2, [SiteOutcome("site-x", "fresh", answer)], "lung")
    assert {r["project"] for r in rows.cell_rows + rows.site_rows} == {"lung"}


def test_merge_sums_the_sites_and_keeps_stale_figures() -> None:
    a = _answer("site-a", {("patients", "all", "all"): 12, ("studies", "all", "all"): "<5"})
    b = _answer("site-b", {("patients", "all", "all"): 7, ("studies", "all", "all"): 9})
    old = _answer("site-c", {("patients", "all", "all"): 20}, NOW - dt.timedelta(days=2))
    outcomes = [SiteOutcome("site-a", "fresh", a), SiteOutcome("site-b", "fresh", b),
                SiteOutcome("site-c", "stale", old, "site_failed", "not connected"),
                SiteOutcome("site-d", "unavailable", None, "missing", "no answer")]
    collection = collect("1", NOW, 5, outcomes)
    network = {(r["metric"]): r for r in collection.cell_rows if r["site"] == NETWORK}
    assert network["patients"]["count"] == 39 and network["patients"]["reported"] == "39"
    assert network["studies"]["count"] is None and network["studies"]["suppressed_sites"] == 1
    assert network["studies"]["reported"] == ">=10"  # each withheld cell is at least 1
    stale = [r for r in collection.cell_rows if r["site"] == "site-c"]
    assert stale and all(r["status"] == "stale" and r["figures_at"] == old.computed_at for r in stale)
    statuses = {r["site"]: (r["status"], r["reason"]) for r in collection.site_rows}
    assert statuses == {"site-a": ("fresh", None), "site-b": ("fresh", None), "site-c": ("stale", "site_failed"),
                        "site-d": ("unavailable", "missing")}
    assert pivot(collection)[0] == {"metric": "patients", "dimension": "all", "category": "all", "site-a": "12",
                                    "site-b": "7", "site-c": "20", "site-d": "", NETWORK: "39"}
    with pytest.raises(ValueError, match="may not be called"):
        collect("2", NOW, 5, [SiteOutcome(NETWORK, "fresh", a)])


# -- three sites over the real federation channel ----------------------------------------------

@dataclass
class Hub:
    instance: dg.DagsterInstance
    resources: dict
    lake: Lake


@pytest.fixture(scope="module")
def flower(federation: Federation) -> Iterator[LocalFederation]:
    with federation.network("flower-statistics") as network:
        yield network


@pytest.fixture(scope="module")
def hub(federation: Federation, flower: LocalFederation) -> Iterator[Hub]:
    lake = Lake(federation.root / "hub" / "lake")
    resources = {"federation": federation.resource(flower), "lake": LakeResource(uri=lake.root)}
    with dg.instance_for_test() as instance:
        yield Hub(instance, resources, lake)


def _collect(hub: Hub, threshold: int = 5, timeout_s: float = 60.0) -> dict:
    result = dg.materialize([network_statistics], instance=hub.instance, resources=hub.resources,
                            run_config={"ops": {"network_statistics": {"config": {"threshold": threshold,
                                                                                  "timeout_s": timeout_s}}}})
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    return {k: v.value for k, v in metadata.items()}


def _snapshot(lake: Lake, snapshot_id: str) -> pl.DataFrame:
    return lake.read(NETWORK_STATISTICS, pl.col("snapshot_id") == snapshot_id)


def _reported(rows: pl.DataFrame, site: str) -> dict[tuple[str, str, str], str]:
    return {(r["metric"], r["dimension"], r["category"]): r["reported"]
            for r in rows.filter(pl.col("site") == site).iter_rows(named=True)}


@pytest.fixture(scope="module")
def first(hub: Hub) -> dict:
    return _collect(hub)


@pytest.mark.slow
def test_hub_table_is_the_sum_of_the_sites_tables(federation: Federation, hub: Hub, first: dict) -> None:
    assert first["fresh_sites"] == 3 and first["stale_sites"] == []
    assert "data:image/png;base64," in first["per_site_chart"]  # matplotlib is installed here
    rows = _snapshot(hub.lake, first["snapshot_id"])
    raw = {site: compute_figures(Lake(federation.homes[site].lake)).cells for site in SITES}
    for site in SITES:
        # The site's own table with small cells suppressed, exactly as the hub stored it.
        own = site_answer(Lake(federation.homes[site].lake), site, 5)
        assert _reported(rows, site) == {k: str(v) for k, v in own.cells.items()}
        for row in rows.filter(pl.col("site") == site).iter_rows(named=True):
            value = raw[site][(row["metric"], row["dimension"], row["category"])]
            if row["reported"] == "<5":
                assert 1 <= value <= 4 and row["count"] is None and row["suppressed"]
            elif row["reported"] == ">=5":
                assert value >= 5 and row["count"] is None and row["suppressed"]
            else:
                assert row["count"] == value and not row["suppressed"]
        assert own.cells[("patients", "all", "all")] == "<5"  # four patients per site

    network = rows.filter(pl.col("site") == NETWORK)
    assert network.height == len(set().union(*(set(c) for c in raw.values())))
    reported = {site: _reported(rows, site) for site in SITES}
    for row in network.iter_rows(named=True):
        key = (row["metric"], row["dimension"], row["category"])
        clear = [raw[s].get(key, 0) for s in SITES if reported[s].get(key, "0").isdigit()]
        assert row["suppressed_sites"] == len(SITES) - len(clear)
        if not row["suppressed_sites"]:  # nothing withheld: the network total is the sum of the sites' tables
            assert row["count"] == sum(raw[s].get(key, 0) for s in SITES) and row["reported"] == str(row["count"])
        else:  # no exact total; a lower bound: the counts in the clear, and at least 1 per withheld cell
            assert row["count"] is None and row["reported"] == f">={sum(clear) + row['suppressed_sites']}"
    instances = network.filter((pl.col("metric") == "instances") & (pl.col("dimension") == "all"))
    assert instances["count"].to_list() == [sum(raw[s][("instances", "all", "all")] for s in SITES)]

    sites = hub.lake.read(NETWORK_SITES, pl.col("snapshot_id") == first["snapshot_id"])
    assert sorted(sites["site"]) == list(SITES) and set(sites["status"]) == {"fresh"}
    for row in sites.iter_rows(named=True):
        last = Lake(federation.homes[row["site"]].lake).read(INSTANCES)["ingested_at"].max()
        assert row["last_ingest_at"] == last.replace(second=0, microsecond=0)  # type: ignore[union-attr]


@pytest.mark.slow
def test_no_identifier_in_any_answer(federation: Federation, first: dict) -> None:
    received = [p for p in federation.hub_store.files(EXPERIMENT) if "received" in p.parts]
    assert len(received) >= len(SITES) and all(p.parent.name == "statistics" for p in received)
    for site, home in federation.homes.items():
        identifiers = site_identifiers(Lake(home.lake))
        assert len(identifiers) > 50
        for path in received:
            assert not leaked_identifiers(path.read_bytes(), identifiers), f"{path} leaks {site}'s identifiers"


@pytest.mark.slow
@pytest.mark.tools("prometheus")
def test_prometheus_reads_back_the_hub_table(hub: Hub, first: dict, tmp_path: Path) -> None:
    """The hub's endpoint, scraped by a real Prometheus: every figure in the latest
    collection reads back through Prometheus' query API as the Delta table holds it."""
    server = serve(build_registry("hub", hub.lake, hub.instance), "127.0.0.1", 0)
    try:
        with prometheus.running_prometheus(tmp_path / "prometheus",
                                           {"hub": [f"127.0.0.1:{server.server_port}"]}) as url:
            prometheus.wait_for_scrape(url, "hub")
            scraped = prometheus.values(url, '{__name__=~"kaapana_network_.*"}')
            runs = prometheus.values(url, "kaapana_dagster_failed_runs")
    finally:
        server.shutdown()
    rows = _snapshot(hub.lake, first["snapshot_id"])
    expected = {tuple(sorted({"__name__": f"kaapana_network_{r['metric']}", "site": r["site"],
                              "dimension": r["dimension"], "category": r["category"]}.items())): float(r["count"])
                for r in rows.iter_rows(named=True) if r["count"] is not None}
    assert expected and {k: v for k, v in scraped.items() if k in expected} == expected
    cells = {k: v for k, v in scraped.items() if dict(k)["__name__"] in {f"kaapana_network_{m}" for m in
                                                                          ("patients", "studies", "series",
                                                                           "instances")}}
    assert set(cells) <= set(expected)  # a suppressed cell is absent, never a number
    for site in SITES:
        assert scraped[(("__name__", "kaapana_network_site_up"), ("site", site))] == 1.0
    withheld = {r["metric"] for r in rows.filter(pl.col("suppressed_sites") > 0).iter_rows(named=True)}
    assert {dict(k)["metric"] for k in scraped if dict(k)["__name__"] == "kaapana_network_suppressed_sites"} == withheld
    assert runs == {}  # every run of this instance succeeded


@pytest.mark.slow
def test_a_site_taken_down_is_stale_with_its_last_figures(federation: Federation, flower: LocalFederation,
                                                          hub: Hub, first: dict) -> None:
    previous = hub.lake.read(NETWORK_SITES).sort("collected_at")["snapshot_id"][-1]
    before = _snapshot(hub.lake, previous)
    flower.stop_site("site-c")
    try:
        metadata = _collect(hub, timeout_s=30)  # the asset does not fail
    finally:
        flower.start_site(next(s for s in federation.local_sites() if s.name == "site-c"))
        flower.wait_connected(3)
    assert metadata["fresh_sites"] == 2 and metadata["stale_sites"] == ["site-c"]
    sites = hub.lake.read(NETWORK_SITES, pl.col("snapshot_id") == metadata["snapshot_id"])
    stale = sites.filter(pl.col("site") == "site-c").row(0, named=True)
    assert stale["status"] == "stale" and stale["reason"] == "site_failed"
    rows = _snapshot(hub.lake, metadata["snapshot_id"])
    site_c = rows.filter(pl.col("site") == "site-c")
    assert set(site_c["status"]) == {"stale"}
    assert _reported(rows, "site-c") == _reported(before, "site-c")  # its last known figures
    assert set(site_c["figures_at"]) == set(before.filter(pl.col("site") == "site-c")["figures_at"])
    # The stale site's figures still count in the network total.
    total = rows.filter((pl.col("site") == NETWORK) & (pl.col("metric") == "series") & (pl.col("dimension") == "all"))
    series = [_reported(rows, site)[("series", "all", "all")] for site in SITES]
    hidden = sum(1 for v in series if not v.isdigit())
    assert total["suppressed_sites"].to_list() == [hidden]
    assert total["reported"].to_list() == [f"{'>=' if hidden else ''}{sum(int(v) for v in series if v.isdigit()) + hidden}"]

    from prometheus_client import generate_latest

    text = generate_latest(build_registry("hub", hub.lake)).decode()
    assert 'kaapana_network_site_up{site="site-c"} 0.0' in text and 'kaapana_network_site_up{site="site-a"} 1.0' in text
    assert 'kaapana_network_sites{status="stale"} 1.0' in text


@pytest.mark.slow
def test_the_threshold_is_set_at_the_hub(hub: Hub) -> None:
    metadata = _collect(hub, threshold=100)
    rows = _snapshot(hub.lake, metadata["snapshot_id"])
    for site in SITES:
        assert _reported(rows, site)[("instances", "all", "all")] == "<100"  # 68 instances per site
    assert set(rows["threshold"]) == {100}
    total = rows.filter((pl.col("site") == NETWORK) & (pl.col("metric") == "instances") & (pl.col("dimension") == "all"))
    assert total["reported"].to_list() == [">=3"] and total["suppressed_sites"].to_list() == [3]


# -- the asset's edges ---------------------------------------------------------------------------

def test_the_schedule_runs_only_at_a_hub(tmp_path: Path) -> None:
    from kaapana_assets.monitoring.assets import network_statistics_schedule
    from resources.federation import FederationResource

    for federation_file, expected in (("", dg.SkipReason), (str(tmp_path / "federation.yaml"), dg.RunRequest)):
        context = dg.build_schedule_context(resources={"federation": FederationResource(
            federation_file=federation_file, folder=str(tmp_path / "hub"))})
        assert isinstance(network_statistics_schedule(context), expected)


def test_without_a_federation_the_asset_says_so(tmp_path: Path) -> None:
    from resources.federation import FederationResource

    with dg.instance_for_test() as instance:
        result = dg.materialize([network_statistics], instance=instance, raise_on_error=False, resources={
            "federation": FederationResource(folder=str(tmp_path / "hub")),
            "lake": LakeResource(uri=str(tmp_path / "lake"))})
    assert not result.success
    assert "no federation configured" in result.get_step_failure_events()[0].step_failure_data.error.message


@pytest.mark.slow  # starts Flower's `flwr run` (which finds no SuperLink)
def test_with_the_superlink_down_every_site_is_reported(tmp_path: Path) -> None:
    from kaapana_assets.federation.credentials import create_hub_certificates
    from kaapana_assets.federation.local import free_port
    from kaapana_assets.federation.sites import SiteEntry, write_sites
    from kaapana_assets.federation.store import FederationStore
    from kaapana_assets.monitoring.network import remember
    from resources.federation import FederationResource

    certificates = create_hub_certificates(tmp_path / "certificates", ["127.0.0.1"])
    federation_file = write_sites(tmp_path / "federation.yaml", [SiteEntry(s, key=generate_site_key())
                                                                  for s in ("site-a", "site-b")])
    store = FederationStore(tmp_path / "hub")
    known = site_answer(make_site_lake(tmp_path / "site-a-lake"), "site-a", 5, NOW)
    remember(store, {"site-a": known})
    lake = Lake(tmp_path / "lake")
    resources = {"federation": FederationResource(superlink=f"127.0.0.1:{free_port()}",
                                                  root_certificate=str(certificates["ca"]),
                                                  federation_file=str(federation_file), folder=str(store.root)),
                 "lake": LakeResource(uri=lake.root)}
    with dg.instance_for_test() as instance:
        result = dg.materialize([network_statistics], instance=instance, resources=resources)
    metadata = {k: v.value for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()}
    assert metadata["fresh_sites"] == 0 and metadata["stale_sites"] == ["site-a", "site-b"]
    assert "left no result" in metadata["channel_error"]
    sites = {r["site"]: r for r in lake.read(NETWORK_SITES).iter_rows(named=True)}
    assert (sites["site-a"]["status"], sites["site-a"]["reason"]) == ("stale", "channel")
    assert sites["site-b"]["status"] == "unavailable"  # never answered: nothing known
    rows = lake.read(NETWORK_STATISTICS)
    assert _reported(rows, "site-a") == {k: str(v) for k, v in known.cells.items()}
    assert set(rows.filter(pl.col("site") == "site-a")["figures_at"]) == {NOW}
