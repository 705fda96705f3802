"""Federated nnU-Net through Dagster with the local transport: three non-IID sites, each
with its own KAAPANA_HOME (lake, archive, MLflow) and its own Dagster instance; the hub
plans from their fingerprints, runs rounds, registers the model. Faults: a site that
fails, below and above quorum; a foreign key; tampered and replayed updates."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from kaapana_assets.federated.assets import federated_model, federated_plan, federated_rounds
from kaapana_assets.federated.exchange import generate_site_key
from kaapana_assets.federated.guard import leaked_identifiers, site_identifiers
from kaapana_assets.federated.hub import ExperimentSpec, collect_updates
from kaapana_assets.federated.partitions import round_key
from kaapana_assets.federated.store import ExchangeStore
from kaapana_assets.lake import Lake
from resources.federation import FederationResource
from tests.helpers import SITES, Federation

# Session fixtures train real networks on 2 cores: allow more than the default 10 minutes
# for whichever test happens to set them up.
pytestmark = [pytest.mark.timeout(1500), pytest.mark.slow]  # slow tier: trains nnU-Net


def _materialize(assets: list, partition: str, instance: dg.DagsterInstance, resources: dict,
                 raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
    return dg.materialize(assets, partition_key=partition, instance=instance, resources=resources,
                          selection=[assets[-1]], raise_on_error=raise_on_error)


@pytest.fixture(scope="session")
def three_rounds(federation: Federation):  # type: ignore[no-untyped-def]
    """Plan, three rounds and the registered model, once per session."""
    resources = federation.hub(federation.resource())
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("federated_experiments", ["liver-fed"])
        plan = _materialize([federated_plan], "liver-fed", instance, resources)
        rounds = [_materialize([federated_plan, federated_rounds], round_key("liver-fed", r), instance, resources)
                  for r in (1, 2, 3)]
        model = _materialize([federated_rounds, federated_model], "liver-fed", instance, resources)
        yield plan, rounds, model, resources


def _metadata(result: dg.ExecuteInProcessResult) -> dict:
    return {k: v.value for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()}


def test_three_sites_three_rounds_improve(federation: Federation, three_rounds) -> None:  # type: ignore[no-untyped-def]
    plan, rounds, model, resources = three_rounds
    plan_meta = _metadata(plan)
    assert plan_meta["cases"] == 12 and not plan_meta["excluded_sites"]
    table = Lake(federation.root / "hub" / "lake").read("federated_rounds")
    global_rows = table.filter(pl.col("site") == "global").sort("round")
    assert global_rows["round"].to_list() == [1, 2, 3]
    per_site = table.filter(pl.col("status") == "aggregated")
    assert per_site.height == 9 and set(per_site["site"]) == set(SITES)
    assert per_site["cases"].to_list() == [3] * 9  # 4 patients per site, 1 held out for validation
    dice = global_rows["dice"].to_list()
    print("global Dice by round:", dice)
    assert dice[-1] > dice[0] and dice[-1] > 0.3  # the global model improves over the rounds
    assert all(later >= earlier - 0.05 for earlier, later in zip(dice, dice[1:], strict=False))

    meta = _metadata(model)
    assert meta["rounds"] == 3 and meta["promoted"]
    tracking = resources["mlflow"].tracking()
    version = tracking.version_by_alias("nnunet-liver-train")
    assert str(version.version) == str(meta["model_version"])
    assert version.tags["kaapana.source"] == "federated" and version.tags["kaapana.sites"] == ",".join(SITES)
    assert version.tags["kaapana.rounds"] == "3" and version.tags["kaapana.plan_sha256"] == plan_meta["plan_sha256"]
    runs = tracking.client().search_runs([tracking.client().get_experiment_by_name("kaapana").experiment_id],
                                         "tags.`kaapana.federated_experiment` = 'liver-fed'")
    parent = next(r for r in runs if r.data.tags.get("kaapana.role") == "experiment")
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["kaapana.role"] for r in nested) == ["model", "round", "round", "round"]

    # Every site ran its own jobs on its own Dagster instance.
    for site in SITES:
        instance = dg.DagsterInstance.local_temp(str(federation.homes[site].root / "dagster"))
        try:
            done = instance.get_materialized_partitions(dg.AssetKey("site_update"))
            assert done == {round_key("liver-fed", r) for r in (1, 2, 3)}
        finally:
            instance.dispose()


def test_nothing_identifying_leaves_a_site(federation: Federation, three_rounds) -> None:  # type: ignore[no-untyped-def]
    """Scan every byte in the exchange for every patient name/ID and study/series/SOP UID."""
    files = federation.exchange.files("liver-fed")
    assert len([f for f in files if f.suffix == ".sealed"]) == 3 + 3 * 3 * 2  # fingerprints, updates, evaluations
    for site, home in federation.homes.items():
        identifiers = site_identifiers(Lake(home.lake))
        assert len(identifiers) > 50
        for path in files:
            assert not leaked_identifiers(path.read_bytes(), identifiers), f"{path} leaks {site}'s identifiers"


def test_tampered_and_replayed_updates_are_rejected(federation: Federation, three_rounds,  # type: ignore[no-untyped-def]
                                                    tmp_path: Path) -> None:
    store = ExchangeStore(tmp_path / "exchange")
    shutil.copytree(federation.exchange.experiment_dir("liver-fed"), store.experiment_dir("liver-fed"))
    tampered = store.envelope_path("liver-fed", 3, "update", "site-a")
    data = bytearray(tampered.read_bytes())
    data[-100] ^= 0x01
    tampered.write_bytes(bytes(data))
    replayed = store.envelope_path("liver-fed", 3, "update", "site-b")
    replayed.write_bytes(store.envelope_path("liver-fed", 2, "update", "site-b").read_bytes())
    updates, rejected = collect_updates(store, "liver-fed", 3, "update", federation.keys, list(SITES))
    assert [u.site for u in updates] == ["site-c"]
    assert {(r.site, r.reason) for r in rejected} == {("site-a", "unauthentic"), ("site-b", "replayed")}
    # A key the hub does not hold for site-c (a foreign or rotated key): rejected too.
    foreign = {**federation.keys, "site-c": generate_site_key()}
    updates, rejected = collect_updates(store, "liver-fed", 3, "update", foreign, ["site-c"])
    assert not updates and [(r.site, r.reason) for r in rejected] == [("site-c", "unauthentic")]


def test_spec_refuses_hostile_names() -> None:
    with pytest.raises(ValueError, match="not allowed"):
        ExperimentSpec("../etc", "liver-train", ["liver"], 1, 1, "fedavg", {})
    with pytest.raises(ValueError, match="not allowed"):
        ExchangeStore("/tmp/x").envelope_path("exp", 1, "update", "../../site")


def test_site_failure_quorum_and_retry(federation: Federation) -> None:
    """site-b's accelerator is gone (training raises): with quorum 1 of 2 the round completes
    without it; with quorum 2 it fails cleanly and aggregates nothing; once site-b is fixed a
    retry of the round succeeds and the experiment goes on."""
    pair = ("site-a", "site-b")
    broken = {"site-b": "cuda:99"}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("federated_experiments", ["faults"])
        _materialize([federated_plan], "faults", instance, federation.hub(federation.resource(pair, min_sites=2)))
        store = federation.exchange
        # Quorum 1: completes with site-a alone, site-b's failure recorded.
        lenient = federation.hub(federation.resource(pair, min_sites=1, devices=broken))
        _materialize([federated_plan, federated_rounds], "faults|1", instance, lenient)
        rows = Lake(federation.root / "hub" / "lake").read("federated_rounds", pl.col("experiment") == "faults")
        statuses = dict(zip(rows.filter(pl.col("round") == 1)["site"], rows.filter(pl.col("round") == 1)["status"], strict=True))
        assert statuses["site-a"] == "aggregated" and statuses["site-b"] == "failed" and statuses["global"] == "global"
        # Quorum 2: round 2 fails, nothing aggregated, no global model written.
        strict = federation.hub(federation.resource(pair, min_sites=2, devices=broken))
        result = _materialize([federated_plan, federated_rounds], "faults|2", instance, strict, raise_on_error=False)
        assert not result.success
        failure = result.get_step_failure_events()[0].step_failure_data.error.message
        assert "1 of 2 site updates arrived, 2 needed" in failure and "nothing aggregated" in failure
        assert not store.has_global("faults", 2)
        # Round 3 cannot run before round 2 has completed.
        early = _materialize([federated_plan, federated_rounds], "faults|3", instance, strict, raise_on_error=False)
        assert "materialize faults|2 first" in early.get_step_failure_events()[0].step_failure_data.error.message
        # site-b recovers: the retry of round 2 aggregates both.
        healthy = federation.hub(federation.resource(pair, min_sites=2))
        _materialize([federated_plan, federated_rounds], "faults|2", instance, healthy)
        assert store.has_global("faults", 2)
        rows = Lake(federation.root / "hub" / "lake").read("federated_rounds", pl.col("experiment") == "faults")
        assert set(rows.filter((pl.col("round") == 2) & (pl.col("status") == "aggregated"))["site"]) == set(pair)
        beyond = _materialize([federated_plan, federated_rounds], "faults|4", instance, healthy, raise_on_error=False)
        assert "faults has 3 rounds" in beyond.get_step_failure_events()[0].step_failure_data.error.message


def test_round_chain_sensor_requests_next_round_then_model(tmp_path: Path) -> None:
    import definitions
    from kaapana_assets.federated.assets import federated_round_chain
    from kaapana_assets.federated.hub import publish_experiment

    store = ExchangeStore(tmp_path / "exchange")
    publish_experiment(store, ExperimentSpec("chain", "liver-train", ["liver"], 2, 1, "fedavg", {}))
    with dg.instance_for_test() as instance, dg.partition_loading_context(dynamic_partitions_store=instance):
        instance.add_dynamic_partitions("federated_experiments", ["chain"])
        instance.report_runless_asset_event(dg.AssetMaterialization("federated_rounds", partition="chain|1"))
        # The first tick only notes where history ends: finished rounds are not re-run.
        first = federated_round_chain(dg.build_sensor_context(
            instance=instance, definitions=definitions.defs,
            resources={"federation": FederationResource(exchange=str(store.root))}))
        assert not first.run_requests
        requests = []
        cursor = first.cursor
        for r in (1, 2):
            instance.report_runless_asset_event(dg.AssetMaterialization("federated_rounds", partition=f"chain|{r}"))
            context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=definitions.defs,
                                              resources={"federation": FederationResource(exchange=str(store.root))})
            result = federated_round_chain(context)
            requests.extend(result.run_requests)
            cursor = result.cursor
        assert (requests[0].job_name, requests[0].partition_key) == ("federated_round", "chain|2")
        assert (requests[1].job_name, requests[1].partition_key) == ("register_federated_model", "chain")


def test_cli_shows_rounds_and_makes_keys(federation: Federation, three_rounds, capsys) -> None:  # type: ignore[no-untyped-def]
    import base64

    from kaapana_assets.cli import main

    assert main(["federation", "key"]) == 0
    assert len(base64.b64decode(capsys.readouterr().out.strip())) == 32
    assert main(["federation", "rounds", "liver-fed", "--home", str(federation.root / "hub")]) == 0
    out = capsys.readouterr().out
    assert "federated rounds of liver-fed" in out and out.count("aggregated") == 9


def test_a_superseded_round_is_not_recomputed(federation: Federation, three_rounds) -> None:  # type: ignore[no-untyped-def]
    """Round 3 was trained from round 2's model: recomputing round 2 would orphan it."""
    _, _, _, resources = three_rounds
    before = federation.exchange.global_path("liver-fed", 2).read_bytes()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("federated_experiments", ["liver-fed"])
        result = _materialize([federated_plan, federated_rounds], round_key("liver-fed", 2), instance, resources,
                              raise_on_error=False)
    assert not result.success
    assert "start a new experiment" in result.get_step_failure_events()[0].step_failure_data.error.message
    assert federation.exchange.global_path("liver-fed", 2).read_bytes() == before
