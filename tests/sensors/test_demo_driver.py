"""The demo's sensor driver on a toy code location: a tick adds (and deletes) the dynamic
partitions it asks for, its runs execute in-process, a failed run is an outcome."""

# No `from __future__ import annotations`: Dagster reads the asset's context annotation at runtime.
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import pytest

from kaapana_assets.demo_driver import run_requests, tick

letters = dg.DynamicPartitionsDefinition(name="letters")


@dg.asset(partitions_def=letters)
def letter(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    if context.partition_key == "bad":
        raise ValueError("bad letter")
    return dg.MaterializeResult(metadata={"letter": context.partition_key})


letter_job = dg.define_asset_job("letter_job", selection=[letter])


@dg.sensor(jobs=[letter_job])
def arrivals(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Two new letters, a stale one dropped, a run for each new one; the cursor counts ticks."""
    new = ["a", "bad"]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(job_name=letter_job.name, partition_key=k, tags={"origin": "arrivals"})
                      for k in new],
        dynamic_partitions_requests=[letters.build_add_request(new), letters.build_delete_request(["stale"])],
        cursor=str(int(context.cursor or 0) + 1),
    )


@dg.sensor(job=letter_job)
def single_job(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Leaves job_name out, as a sensor with one job may."""
    return dg.SensorResult(run_requests=[dg.RunRequest(partition_key="z")],
                           dynamic_partitions_requests=[letters.build_add_request(["z"])])


DEFS = dg.Definitions(assets=[letter], jobs=[letter_job], sensors=[arrivals, single_job])


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


def test_tick_applies_partitions_and_runs_each_request(instance: dg.DagsterInstance) -> None:
    instance.add_dynamic_partitions("letters", ["stale"])
    ticked = tick(DEFS, instance, "arrivals")
    assert ticked.cursor == "1"
    assert sorted(instance.get_dynamic_partitions("letters")) == ["a", "bad"]
    assert [r.partition_key for r in ticked.run_requests] == ["a", "bad"]

    shown: list[str] = []

    @contextmanager
    def status(text: str) -> Iterator[None]:
        shown.append(text)
        yield

    outcomes = list(run_requests(DEFS, instance, ticked.run_requests, status=status))
    assert [(o.label, o.success) for o in outcomes] == [("a", True), ("bad", False)]  # a failure is an outcome
    assert shown == ["running letter_job a", "running letter_job bad"]
    run = instance.get_run_by_id(outcomes[0].result.run_id)
    assert run is not None and run.tags["origin"] == "arrivals" and run.tags["dagster/partition"] == "a"
    assert outcomes[0].result.asset_materializations_for_node("letter")[0].metadata["letter"].value == "a"
    assert tick(DEFS, instance, "arrivals", cursor=ticked.cursor).cursor == "2"


def test_a_single_job_sensor_gets_its_job_name(instance: dg.DagsterInstance) -> None:
    ticked = tick(DEFS, instance, "single_job")
    assert [r.job_name for r in ticked.run_requests] == ["letter_job"]
    (outcome,) = run_requests(DEFS, instance, ticked.run_requests)
    assert outcome.success and outcome.job_name == "letter_job" and outcome.label == "z"
