"""The privacy budget of a federated experiment: ε per site composed over the rounds it took
part in, checked against dp-accounting's own numbers computed here for known mechanisms; a
round refused before anything is sent or written, through the real round asset."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import dagster as dg
import dp_accounting
import pyarrow as pa
import pytest
from deltalake import write_deltalake
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from kaapana_assets.federated import accounting
from kaapana_assets.federated.accounting import (
    BudgetExceeded,
    PrivacyBudget,
    Release,
    RoundMechanism,
    check_round,
    epsilon,
    read_releases,
    record_releases,
    round_mechanism,
    spent,
)
from kaapana_assets.federated.assets import _arrow, federated_plan, federated_rounds
from kaapana_assets.federated.hub import ExperimentSpec, Privacy, publish_experiment, with_digests
from kaapana_assets.federated.partitions import round_key
from kaapana_assets.federated.privacy import noise_stdv
from kaapana_assets.federation.store import FederationStore
from kaapana_assets.home import KaapanaHome
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import FEDERATED_ROUNDS
from kaapana_assets.training.tracking import Tracking
from resources import site_resources

DELTA = 1e-5
SITES = ["site-a", "site-b", "site-c"]


def _reference(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float = DELTA) -> float:
    """dp-accounting used directly, as its own documentation composes a DP-SGD run."""
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    reference = RdpAccountant()
    reference.compose(event, rounds)
    return reference.get_epsilon(delta)


@pytest.mark.parametrize(("sampling_rate", "rounds"), [(1.0, 3), (1.0, 100), (0.01, 3), (0.01, 100)])
def test_epsilon_is_dp_accountings(sampling_rate: float, rounds: int) -> None:
    mechanism = RoundMechanism(noise_multiplier=1.1, sampling_rate=sampling_rate)
    ours = epsilon([mechanism] * rounds, DELTA)
    assert ours == pytest.approx(_reference(1.1, sampling_rate, rounds), rel=1e-12)
    assert 0 < ours < math.inf


def test_rdp_is_an_upper_bound_of_pld() -> None:
    """For this mechanism the RDP accountant's ε is above the tighter PLD's: refusing on it is on the safe side."""
    pld = PLDAccountant()
    pld.compose(dp_accounting.GaussianDpEvent(1.1), 3)
    assert pld.get_epsilon(DELTA) <= epsilon([RoundMechanism(1.1)] * 3, DELTA)


def test_mixed_mechanisms_compose() -> None:
    """Rounds with different noise (a plan re-materialized with other settings) compose as such."""
    mixed = epsilon([RoundMechanism(1.1), RoundMechanism(2.0), RoundMechanism(1.1)], DELTA)
    reference = RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(1.1), 2)
    reference.compose(dp_accounting.GaussianDpEvent(2.0))
    assert mixed == pytest.approx(reference.get_epsilon(DELTA), rel=1e-12)
    assert epsilon([], DELTA) == 0.0
    assert epsilon([RoundMechanism(0.0)], DELTA) == math.inf  # clipping without noise spends everything


def test_round_mechanism_is_the_noise_relative_to_the_clipping_norm() -> None:
    """z = σ / clipping norm, σ as privacy.py adds it: a sensitivity setting below the clipping
    norm gives less noise than the per-round ε promises, and the accountant counts what is added."""
    honest = Privacy(clipping_norm=0.5, sensitivity=0.5, epsilon=2.0, delta=DELTA)
    assert round_mechanism(honest).noise_multiplier == pytest.approx(math.sqrt(2 * math.log(1.25 / DELTA)) / 2.0)
    assert round_mechanism(honest).noise_multiplier == pytest.approx(noise_stdv(honest) / 0.5)
    understated = Privacy(clipping_norm=50.0, sensitivity=1.0, epsilon=2.0, delta=DELTA)
    assert round_mechanism(understated).noise_multiplier == pytest.approx(round_mechanism(honest).noise_multiplier / 50)
    assert round_mechanism(honest).sampling_rate == 1.0  # every training case of a site contributes
    with pytest.raises(ValueError, match="max_epsilon"):
        Privacy(clipping_norm=1.0, max_epsilon=0.0)
    with pytest.raises(ValueError, match="needs local DP"):
        Privacy(clipping_norm=0.0, max_epsilon=8.0)


def test_rounds_a_site_missed_are_not_counted() -> None:
    z = RoundMechanism(1.1)
    releases = [Release("site-a", 1, z), Release("site-b", 1, z), Release("site-a", 2, z),
                Release("site-a", 3, z), Release("site-b", 3, z)]  # site-b missed round 2, site-c every round
    so_far = spent(releases, SITES, DELTA)
    assert so_far == {"site-a": pytest.approx(_reference(1.1, 1.0, 3)),
                      "site-b": pytest.approx(_reference(1.1, 1.0, 2)), "site-c": 0.0}
    assert so_far["site-a"] > so_far["site-b"] > 0


def test_check_round_refuses_naming_the_site_and_its_numbers() -> None:
    z = RoundMechanism(1.1)
    releases = [Release("site-a", 1, z), Release("site-a", 2, z), Release("site-b", 2, z)]
    after_three, after_two = _reference(1.1, 1.0, 3), _reference(1.1, 1.0, 2)
    budget = PrivacyBudget(max_epsilon=(after_two + after_three) / 2, delta=DELTA)
    with pytest.raises(BudgetExceeded) as refused:
        check_round(releases, "exp", 3, SITES, z, budget)
    assert set(refused.value.over) == {"site-a"}  # site-b and site-c stay within it
    before, after = refused.value.over["site-a"]
    assert before == pytest.approx(after_two) and after == pytest.approx(after_three)
    message = str(refused.value)
    assert "round 3 of exp refused" in message and "site-a" in message and "site-b" not in message
    assert f"{budget.max_epsilon:g}" in message and f"{after_two:.4g}" in message and f"{after_three:.4g}" in message
    allowed = check_round(releases, "exp", 3, ["site-b", "site-c"], z, budget)
    assert allowed == {"site-b": pytest.approx(after_two), "site-c": pytest.approx(_reference(1.1, 1.0, 1))}


def test_the_ledger_keeps_every_release(tmp_path: Path) -> None:
    store = FederationStore(tmp_path)
    assert read_releases(store, "exp") == []
    first = [Release("site-a", 1, RoundMechanism(1.1)), Release("site-b", 1, RoundMechanism(1.1))]
    record_releases(store, "exp", first)
    retried = [Release("site-a", 1, RoundMechanism(1.1))]  # a retried round spends again
    assert record_releases(store, "exp", retried) == first + retried
    assert read_releases(store, "exp") == first + retried


def test_rounds_table_gains_the_epsilon_column(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A hub whose federated_rounds table predates the column: `kaapana federation rounds`
    still reads it, and the next round's MERGE adds the column, which the command shows."""
    from kaapana_assets.cli import main

    lake = Lake(str(KaapanaHome(tmp_path).lake))
    old_schema = pa.schema([f for f in FEDERATED_ROUNDS.schema if f.name != "epsilon"])
    old = {name: None for name in old_schema.names} | {"experiment": "exp", "round": 1, "site": "site-a",
                                                        "status": "aggregated", "row_digest": "old"}
    write_deltalake(lake.uri(FEDERATED_ROUNDS), pa.Table.from_pylist([old], schema=old_schema))
    assert main(["federation", "rounds", "exp", "--home", str(tmp_path)]) == 0
    assert "aggregated" in capsys.readouterr().out
    row = {**old, "round": 2, "epsilon": 3.25, "committed_at": None}
    del row["row_digest"]
    lake.merge(FEDERATED_ROUNDS, _arrow(with_digests([row])))
    rows = lake.read(FEDERATED_ROUNDS).sort("round")
    assert rows["epsilon"].to_list() == [None, 3.25]
    assert main(["federation", "rounds", "exp", "--home", str(tmp_path)]) == 0
    assert "3.25" in capsys.readouterr().out


def _budgeted_experiment(store: FederationStore, max_epsilon: float) -> ExperimentSpec:
    spec = ExperimentSpec(experiment="budget", cohort="liver-train", labels=["liver"], rounds=5, min_sites=2,
                          strategy="fedavg", schedule={},
                          privacy={"clipping_norm": 1.0, "sensitivity": 1.0, "epsilon": 2.0, "delta": DELTA,
                                   "max_epsilon": max_epsilon})
    publish_experiment(store, spec)
    store.write_json("budget", "participants", {"sites": SITES, "cases": dict.fromkeys(SITES, 2)})
    return spec


def test_a_round_beyond_the_budget_is_refused_with_nothing_written(tmp_path: Path) -> None:
    """Two rounds spent (site-c missed the second): round 3 would take site-a and site-b past
    the budget. The real round asset refuses it before its Flower run: no rows, no model, no
    MLflow run, no ledger entry."""
    home = KaapanaHome(tmp_path / "hub")
    resources = site_resources(home.root)
    store = FederationStore(home.hub_federation)
    spec = _budgeted_experiment(store, max_epsilon=1.0)
    z = round_mechanism(spec.dp)
    two, three = _reference(z.noise_multiplier, 1.0, 2), _reference(z.noise_multiplier, 1.0, 3)
    # A budget between two and three rounds' ε: the same spec, published again with it.
    spec = _budgeted_experiment(store, max_epsilon=(two + three) / 2)
    record_releases(store, "budget", [Release(s, 1, z) for s in SITES] + [Release(s, 2, z) for s in SITES[:2]])
    ledger = (store.experiment_dir("budget") / f"{accounting.LEDGER}.json").read_bytes()
    files = store.files("budget")

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("federated_experiments", ["budget"])
        result = dg.materialize([federated_plan, federated_rounds], partition_key=round_key("budget", 3),
                                instance=instance, resources=resources, selection=[federated_rounds],
                                raise_on_error=False)
        assert not result.success
        [failure] = result.get_step_failure_events()
        assert failure.step_failure_data.error is not None
        message = failure.step_failure_data.error.message
        assert "round 3 of budget refused" in message and "privacy budget" in message
        assert "site-a" in message and "site-b" in message and "site-c:" not in message
        assert f"{three:.4g} after round 3" in message
        assert not result.get_asset_materialization_events()
        assert not instance.get_materialized_partitions(dg.AssetKey("federated_rounds"))
        assert not Lake(str(home.lake)).exists(FEDERATED_ROUNDS)
        assert not store.has_global("budget", 3)
        assert (store.experiment_dir("budget") / f"{accounting.LEDGER}.json").read_bytes() == ledger
        assert store.files("budget") == files
        tracking = Tracking(f"sqlite:///{home.root / 'mlflow.db'}", (home.root / "mlartifacts").as_uri())
        experiment = tracking.client().get_experiment_by_name("kaapana")
        assert experiment is None or not tracking.client().search_runs([experiment.experiment_id])

        # With a budget site-a and site-b can afford, the check passes and the round goes on to
        # its Flower run (which has no SuperLink here, so it fails there).
        publish_experiment(store, dataclasses.replace(spec, privacy={**spec.privacy, "max_epsilon": three * 2}))
        onwards = dg.materialize([federated_plan, federated_rounds], partition_key=round_key("budget", 3),
                                 instance=instance, resources=resources, selection=[federated_rounds],
                                 raise_on_error=False)
        error = onwards.get_step_failure_events()[0].step_failure_data.error
        assert error is not None and "refused" not in error.message and "root_certificate" in error.message


def test_a_budget_without_local_dp_is_refused(tmp_path: Path) -> None:
    from resources.federation import FederationResource

    with pytest.raises(dg.Failure, match="local DP is off"):
        FederationResource(folder=str(tmp_path), dp_max_epsilon=8.0).privacy()
    declared = FederationResource(folder=str(tmp_path), dp_clipping_norm=1.0, dp_max_epsilon=8.0).privacy()
    assert Privacy(**declared).max_epsilon == 8.0
    assert "max_epsilon" not in FederationResource(folder=str(tmp_path), dp_clipping_norm=1.0).privacy()
