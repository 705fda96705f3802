"""Federated nnU-Net over a real Flower network: a SuperLink (TLS, SuperNode
authentication) and one SuperNode per site as separate processes on loopback. Each site
has its own KAAPANA_HOME and its own Dagster instance and shares no folder with the hub;
the hub's assets start one Flower run per plan and per round. Learning over three rounds is
checked on the demo's federation (built once per test run); faults on this module's own: a
site that goes away mid-round (quorum, clean failure, retry), an unregistered SuperNode, a
superseded round. Tampered and replayed messages: tests/federation/test_federated_channel.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import torch
from dagster._core.instance.ref import InstanceRef

from kaapana_assets.demo import DEMO_PRIVACY
from kaapana_assets.federated.assets import federated_plan, federated_rounds
from kaapana_assets.federated.partitions import round_key
from kaapana_assets.federation.credentials import create_node_keys
from kaapana_assets.federation.guard import leaked_identifiers, site_identifiers
from kaapana_assets.federation.keys import generate_site_key
from kaapana_assets.federation.local import LocalFederation
from kaapana_assets.federation.store import FederationStore
from kaapana_assets.home import KaapanaHome
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import FEDERATED_ROUNDS
from kaapana_assets.nnunet.registry import find_version
from kaapana_assets.training.tracking import Tracking
from tests.helpers import SITES, Federation

# Session fixtures train real networks on 2 cores: allow more than the default 10 minutes
# for whichever test happens to set them up.
pytestmark = [pytest.mark.timeout(1800), pytest.mark.slow]  # slow tier: trains nnU-Net


@pytest.fixture(scope="module")
def flower(federation: Federation) -> Iterator[LocalFederation]:
    """The SuperLink and three SuperNodes, for this module."""
    with federation.network("flower") as network:
        yield network


FAULTS_PRIVACY = {"dp_clipping_norm": 0.01, "dp_sensitivity": 0.01, "dp_epsilon": 5.0, "dp_delta": 1e-5,
                  "dp_max_epsilon": 100.0}


@pytest.fixture(scope="module")
def faults_plan(federation: Federation, flower: LocalFederation) -> dict:
    """The hub's resources for experiment `faults`, planned over the module's network (its
    global model 0 published): the fault scenario trains it, the cross-site evaluation test
    evaluates its initial network (which no site trained on, whatever ran before)."""
    # Faults, not learning, are under test: the shortest local training that is still a round.
    resources = federation.hub(federation.resource(flower, min_sites=2, rounds=2, **FAULTS_PRIVACY,
                                                   strategy="fedavgm", server_momentum=0.5,
                                                   local_epochs=1, iterations_per_epoch=2))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("federated_experiments", ["faults"])
        _materialize([federated_plan], "faults", instance, resources)
    return resources


def _materialize(assets: list, partition: str, instance: dg.DagsterInstance, resources: dict,
                 raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
    return dg.materialize(assets, partition_key=partition, instance=instance, resources=resources,
                          selection=[assets[-1]], raise_on_error=raise_on_error)


def _failure(result: dg.ExecuteInProcessResult) -> str:
    return result.get_step_failure_events()[0].step_failure_data.error.message


def _metadata(result: dg.ExecuteInProcessResult) -> dict:
    return {k: v.value for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()}


def _demo_sites(demo_home: Path) -> dict[str, KaapanaHome]:
    """The demo's sites: site-a is the hub's own platform, the others live beside it."""
    hub = KaapanaHome(demo_home / "kaapana")
    return {site: hub if site == SITES[0] else KaapanaHome(hub.root / "sites" / site) for site in SITES}


def _latest_metadata(instance: dg.DagsterInstance, asset: str, partition: str) -> dict:
    [record] = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records
    materialization = record.asset_materialization
    assert materialization is not None
    return {k: v.value for k, v in materialization.metadata.items()}


# The three-round federation under test is the demo's (`kaapana demo --rounds 3`, built once
# per test run and shared): its hub, its sites' own homes and the Dagster instance it ran on.
def test_three_sites_three_rounds_improve(demo_home: Path) -> None:
    sites = _demo_sites(demo_home)
    hub = sites[SITES[0]]
    table = Lake(hub.lake).read(FEDERATED_ROUNDS).filter(pl.col("experiment") == "liver-fed")
    global_rows = table.filter(pl.col("site") == "global").sort("round")
    assert global_rows["round"].to_list() == [1, 2, 3]
    per_site = table.filter(pl.col("status") == "aggregated")
    assert per_site.height == 9 and set(per_site["site"]) == set(SITES)
    # 3 patients per site, 1 held out for validation; site-a's reviewed patient is in no training cohort.
    assert per_site.sort("site", "round")["cases"].to_list() == [1] * 3 + [2] * 6
    dice = global_rows["dice"].to_list()
    print("global Dice by round:", dice)
    assert dice[-1] > dice[0] and dice[-1] > 0.3  # the global model improves over the rounds
    assert all(later >= earlier - 0.05 for earlier, later in zip(dice, dice[1:], strict=False))

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(demo_home / "dagster"))) as instance:
        plan_meta = _latest_metadata(instance, "federated_plan", "liver-fed")
        first_round = _latest_metadata(instance, "federated_rounds", round_key("liver-fed", 1))
        meta = _latest_metadata(instance, "federated_model", "liver-fed")
    assert plan_meta["cases"] == 2 + 3 + 3 and not plan_meta["excluded_sites"]
    assert first_round["differential_privacy"] == dataclasses.asdict(DEMO_PRIVACY)  # the demo's local DP
    assert meta["rounds"] == 3 and meta["promoted"]
    tracking = Tracking(f"sqlite:///{hub.root / 'mlflow.db'}", str(hub.root / "mlartifacts"))
    version = find_version(tracking, "nnunet-liver-train")
    assert str(version.version) == str(meta["model_version"])
    assert version.tags["kaapana.source"] == "federated" and version.tags["kaapana.sites"] == ",".join(SITES)
    assert version.tags["kaapana.rounds"] == "3" and version.tags["kaapana.plan_sha256"] == plan_meta["plan_sha256"]
    runs = tracking.client().search_runs([tracking.client().get_experiment_by_name("kaapana").experiment_id],
                                         "tags.`kaapana.federated_experiment` = 'liver-fed'")
    parent = next(r for r in runs if r.data.tags.get("kaapana.role") == "experiment")
    assert parent.data.params["transport"] == "flower"
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["kaapana.role"] for r in nested) == ["model", "round", "round", "round"]

    # Every site's own Dagster instance records its part: fingerprint, updates, evaluations.
    for site, home in sites.items():
        instance = dg.DagsterInstance.local_temp(str(home.root / "dagster"))
        try:
            rounds_done = {round_key("liver-fed", r) for r in (1, 2, 3)}
            assert instance.get_materialized_partitions(dg.AssetKey("site_update")) == rounds_done, site
            assert instance.get_materialized_partitions(dg.AssetKey("site_evaluation")) == rounds_done, site
            assert instance.get_materialized_partitions(dg.AssetKey("site_fingerprint")) == {"liver-fed"}, site
        finally:
            instance.dispose()


def test_nothing_identifying_reached_the_hub(demo_home: Path) -> None:
    """The hub keeps every message it received from a site; scan each for every patient
    name/ID and study/series/SOP UID of every site."""
    sites = _demo_sites(demo_home)
    store = FederationStore(sites[SITES[0]].hub_federation)
    received = [p for p in store.files("liver-fed") if "received" in p.parts]
    assert len(received) == 3 + 3 * 3 * 2  # fingerprints, then updates and evaluations per round
    for site, home in sites.items():
        identifiers = site_identifiers(Lake(home.lake))
        assert len(identifiers) > 50
        for path in received:
            assert not leaked_identifiers(path.read_bytes(), identifiers), f"{path} leaks {site}'s identifiers"


def test_cli_shows_rounds(demo_home: Path, capsys: pytest.CaptureFixture) -> None:
    from kaapana_assets.cli import main

    assert main(["federation", "rounds", "liver-fed", "--home", str(demo_home / "kaapana")]) == 0
    out = capsys.readouterr().out
    assert "federated rounds of liver-fed" in out and out.count("aggregated") == 9


def _site_pids(flower: LocalFederation) -> set[int]:
    return {pid for name in flower.supernodes for pid in flower.site_pids(name)}


def test_an_unregistered_supernode_is_refused(federation: Federation, flower: LocalFederation,
                                              tmp_path: Path) -> None:
    private, _ = create_node_keys(tmp_path, "intruder")  # never registered at the hub
    home = federation.homes["site-a"].root
    from kaapana_assets.federation.local import LocalSite

    process = flower.start_site(LocalSite("intruder", home, generate_site_key()), private_key=private)
    try:
        process.wait(90)
    except subprocess.TimeoutExpired:
        pytest.fail("a SuperNode with an unregistered key stayed connected")
    finally:
        flower.stop_site("intruder")
    log = (flower.folder / "logs" / "supernode-intruder.log").read_text()
    assert process.returncode != 0 and "Failed to activate SuperNode" in log


def _wait_for_clientapp(flower: LocalFederation, site: str, timeout_s: float = 120.0) -> None:
    """Until the site runs a ClientApp (it is working on the hub's message). Its SuperExec
    forks them: they are named flwr-clientapp."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in flower.site_pids(site):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "flwr-clientapp":
                    return
            except OSError:
                continue
        time.sleep(0.2)
    raise TimeoutError("the site never started its ClientApp")


def test_site_lost_mid_round_quorum_then_retry(federation: Federation, flower: LocalFederation,
                                               faults_plan: dict) -> None:
    """Quorum 2 of 3. site-c goes away while it trains: round 1 completes with site-a and
    site-b. With site-b gone as well, round 2 fails cleanly (nothing aggregated, no global
    model). Both come back: the retry of round 2 aggregates all three. This experiment
    also runs with local differential privacy on (clipping, and noise too small to matter),
    and with FedAvgM, whose server momentum the hub keeps from round 1 for the retried round 2.
    A superseded round (round 1, once round 2 exists) is refused, not recomputed.

    Local DP here is a real mechanism (noise multiplier ≈ 0.97 on an update clipped to 0.01,
    harmless to weights this small), and its ε per site is counted over what each site sent:
    site-a every attempt (round 1, the failed and the retried round 2), site-b round 1 and
    the retry, site-c only the retry; equal to dp-accounting's for those compositions."""
    import threading

    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    from kaapana_assets.federated.accounting import read_releases, round_mechanism
    from kaapana_assets.federated.hub import Privacy

    privacy = Privacy(clipping_norm=0.01, sensitivity=0.01, epsilon=5.0, delta=1e-5, max_epsilon=100.0)

    def reference(rounds: int) -> float:  # dp-accounting itself, for `rounds` releases of this mechanism
        accountant = RdpAccountant()
        accountant.compose(dp_accounting.GaussianDpEvent(round_mechanism(privacy).noise_multiplier), rounds)
        return accountant.get_epsilon(privacy.delta)

    resources = faults_plan
    store = federation.hub_store
    sites = {s.name: s for s in federation.local_sites()}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("federated_experiments", ["faults"])
        lost = threading.Thread(target=lambda: (_wait_for_clientapp(flower, "site-c"),
                                                flower.stop_site("site-c")))
        lost.start()
        first_round = _materialize([federated_plan, federated_rounds], "faults|1", instance, resources)
        lost.join()
        declared = _metadata(first_round)["differential_privacy"]
        assert declared["clipping_norm"] == 0.01 and declared["epsilon"] == 5.0 and declared["max_epsilon"] == 100.0
        # site-c went away before it sent its update: it spent nothing in round 1.
        assert _metadata(first_round)["epsilon"] == {"site-a": pytest.approx(reference(1)),
                                                     "site-b": pytest.approx(reference(1)), "site-c": 0.0}
        assert _metadata(first_round)["epsilon_max"] == pytest.approx(reference(1))
        assert _metadata(first_round)["aggregation"] == {"strategy": "fedavgm", "server_momentum": 0.5}
        rows = Lake(federation.root / "hub" / "lake").read(FEDERATED_ROUNDS, pl.col("experiment") == "faults")
        first = dict(zip(rows.filter(pl.col("round") == 1)["site"], rows.filter(pl.col("round") == 1)["status"],
                         strict=True))
        assert first == {"site-a": "aggregated", "site-b": "aggregated", "site-c": "failed", "global": "global"}
        assert set(rows["strategy"]) == {"fedavgm"}
        momentum = store.read_momentum("faults", 1)  # round 1's mean update, as FedAvgM starts it
        start, global_1 = store.read_global("faults", 0), store.read_global("faults", 1)
        assert all(torch.allclose(momentum[k], start[k] - global_1[k], atol=1e-6) for k in start)

        flower.stop_site("site-b")
        result = _materialize([federated_plan, federated_rounds], "faults|2", instance, resources, raise_on_error=False)
        assert not result.success
        assert "1 of 3 site updates arrived, 2 needed" in _failure(result) and "nothing aggregated" in _failure(result)
        assert not store.has_global("faults", 2) and not store.momentum_path("faults", 2).exists()

        flower.start_sites([sites["site-b"], sites["site-c"]])
        flower.wait_connected(3)
        _materialize([federated_plan, federated_rounds], "faults|2", instance, resources)
        assert store.has_global("faults", 2) and store.momentum_path("faults", 2).exists()
        rows = Lake(federation.root / "hub" / "lake").read(FEDERATED_ROUNDS, pl.col("experiment") == "faults")
        assert set(rows.filter((pl.col("round") == 2) & (pl.col("status") == "aggregated"))["site"]) == set(SITES)
        spent = dict(zip(*rows.filter(pl.col("round") == 2).select("site", "epsilon").get_columns(), strict=True))
        print("ε per site after the fault scenario's rounds (δ 1e-05):", spent)
        assert spent == {"site-a": pytest.approx(reference(3)), "site-b": pytest.approx(reference(2)),
                         "site-c": pytest.approx(reference(1)), "global": pytest.approx(reference(3))}
        assert sorted((r.round, r.site) for r in read_releases(store, "faults")) == [
            (1, "site-a"), (1, "site-b"), (2, "site-a"), *sorted((2, s) for s in SITES)]
        beyond = _materialize([federated_plan, federated_rounds], "faults|3", instance, resources, raise_on_error=False)
        assert "faults has 2 rounds" in _failure(beyond)

        # Round 2 was trained from round 1's model: recomputing round 1 would orphan it.
        before = store.global_path("faults", 1).read_bytes()
        again = _materialize([federated_plan, federated_rounds], "faults|1", instance, resources, raise_on_error=False)
        assert not again.success and "start a new experiment" in _failure(again)
        assert store.global_path("faults", 1).read_bytes() == before


def test_sites_only_dial_out(flower: LocalFederation) -> None:
    """No site process listens beyond its own loopback (the SuperNode's runtime API for its
    own ClientApps), and every connection a site holds outside that goes to the one
    SuperLink port: the hub never needs a route into a site."""
    pids = _site_pids(flower)
    port = int(flower.connection.address.rsplit(":", 1)[1])
    sockets = subprocess.run(["ss", "-Htanp"], capture_output=True, text=True, check=True).stdout.splitlines()
    mine = [line for line in sockets if any(f"pid={pid}," in line for pid in pids)]
    assert mine, "the site processes hold no TCP socket at all"
    own_ports = set()
    for line in mine:
        state, local = line.split()[0], line.split()[3]
        if state == "LISTEN":
            assert local.startswith("127.0.0.1:"), f"a site process listens on {local}"
            own_ports.add(int(local.rsplit(":", 1)[1]))
    for line in mine:
        fields = line.split()
        if fields[0] != "ESTAB":
            continue
        peer = int(fields[4].rsplit(":", 1)[1])
        local_port = int(fields[3].rsplit(":", 1)[1])
        assert peer == port or peer in own_ports or local_port in own_ports, line


def test_cross_site_evaluation_with_one_consenting_site(federation: Federation, flower: LocalFederation,
                                                        faults_plan: dict) -> None:
    """cross_site_evaluation over the real SuperLink and SuperNodes. site-a alone consents
    (node config share-local-model): it trains a local baseline from the plan's initial
    network, site-b and site-c decline. Every site then evaluates the global model (round 0,
    trained on nobody) and site-a's model on its own liver-train: site-a refuses its own
    model there (its training cohort: not held out), the others evaluate both. With four
    cases a site, every cell is suppressed, so no site has a comparison to state. The
    matrix is in Delta and in NVFlare's layout; nothing identifying reached the hub. Then
    federated_evaluation of the same model: every site's summaries, suppressed."""
    from kaapana_assets.federated.assets import cross_site_evaluation, federated_evaluation
    from kaapana_assets.lake.schemas import CROSS_SITE_EVALUATIONS, FEDERATED_EVALUATIONS

    store, experiment = federation.hub_store, "faults"
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("federated_experiments", [experiment])
        result = dg.materialize([cross_site_evaluation], partition_key=experiment, instance=instance,
                                resources=faults_plan, run_config={"ops": {"cross_site_evaluation": {"config": {
                                    "cohort": "liver-train", "round": 0, "retrain": True}}}})
    metadata = _metadata(result)
    assert metadata["model_owners"] == ["global", "site-a"]
    assert set(metadata["declined"]) == {"site-b", "site-c"}
    assert "share-local-model is off" in metadata["declined"]["site-b"]
    assert list(metadata["refused"]) == ["site-a@site-a"]
    assert "refused: site-a refuses to evaluate faults:site-a on liver-train v1: IN-SAMPLE" in \
        metadata["refused"]["site-a@site-a"]
    layout = json.loads((store.experiment_dir(experiment) / "cross_val_results.json").read_text())
    assert layout == metadata["cross_val_results"]
    assert set(layout) == set(SITES) and set(layout["site-a"]) == {"global"}
    assert set(layout["site-b"]) == {"global", "site-a"} and layout["site-b"]["site-a"]["dice_liver"] is None
    assert metadata["global_worse_at"] == [] and "heat_map" in metadata
    rows = Lake(federation.root / "hub" / "lake").read(CROSS_SITE_EVALUATIONS, pl.col("experiment") == experiment)
    assert set(zip(rows["data_site"], rows["model_owner"], strict=True)) == {
        ("site-a", "global"), ("site-b", "global"), ("site-b", "site-a"), ("site-c", "global"), ("site-c", "site-a")}
    assert rows["suppressed"].all() and rows["value"].null_count() == rows.height

    received = [p for p in store.files(experiment) if "received" in p.parts
                and ({"model_evaluation", "baseline"} & set(p.parts))]
    assert len(received) == 3 + 3 * 2  # baselines (or declines), then two models at three sites
    for site, site_home in federation.homes.items():
        identifiers = site_identifiers(Lake(site_home.lake))
        for path in received:
            assert not leaked_identifiers(path.read_bytes(), identifiers), f"{path} leaks {site}'s identifiers"

    # federated_evaluation: the same global model with the distance metrics, one table and one
    # box plot per site; four cases a site are below the threshold, so every cell leaves suppressed.
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("federated_experiments", [experiment])
        result = dg.materialize([federated_evaluation], partition_key=experiment, instance=instance,
                                resources=faults_plan, run_config={"ops": {"federated_evaluation": {"config": {
                                    "cohort": "liver-train", "round": 0}}}})
    metadata = _metadata(result)
    assert metadata["sites"] == sorted(SITES) and metadata["refused_sites"] == {}
    assert {f"boxplot_{site}" for site in SITES} <= set(metadata)
    summaries = Lake(federation.root / "hub" / "lake").read(FEDERATED_EVALUATIONS, pl.col("experiment") == experiment)
    assert set(summaries["site"]) == set(SITES) and {"dice", "hd95_mm", "assd_mm"} <= set(summaries["metric"])
    assert summaries["suppressed"].all() and set(summaries["reported"]) == {"<5"} and summaries["mean"].null_count() == summaries.height
    data_version = result.get_asset_materialization_events()[0].materialization.tags["dagster/data_version"]
    assert data_version and len(data_version) == 16
