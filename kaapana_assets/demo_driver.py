"""What the Dagster daemon does with a sensor, done by hand for the demo (and its tests): one
tick, the dynamic partitions it asks for, then each run it requests, in-process on the
given instance so the runs show in the UI afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import dagster as dg

# A context manager shown while a run executes (the demo passes rich's console.status).
Status = Callable[[str], AbstractContextManager[object]]
PartitionsRequest = dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest


@dataclass(frozen=True)
class Tick:
    """One evaluation of a sensor: the runs it requests (job names filled in) and its new cursor."""

    run_requests: list[dg.RunRequest]
    cursor: str | None


@dataclass(frozen=True)
class RunOutcome:
    request: dg.RunRequest
    job_name: str
    label: str  # the partition key, else the job name
    result: dg.ExecuteInProcessResult

    @property
    def success(self) -> bool:
        return self.result.success


def log_level_config(level: str) -> dict[str, Any]:
    """Run config for the console logger's level: the demo's console tells the story, the
    run logs (in the Dagster UI) keep the detail."""
    return {"loggers": {"console": {"config": {"log_level": level}}}}


def apply_partitions_requests(instance: dg.DagsterInstance, requests: Sequence[PartitionsRequest]) -> None:
    """Add and delete dynamic partitions as the daemon would before launching the tick's runs."""
    for request in requests:
        keys = list(request.partition_keys or [])
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, keys)
        else:
            for key in keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, sensor_name: str, *,
         resources: Mapping[str, object] | None = None, cursor: str | None = None) -> Tick:
    """Evaluate one tick of the sensor, apply the dynamic partitions it requests, and return
    its run requests (not yet run) and cursor."""
    sensor = defs.resolve_sensor_def(sensor_name)  # get_sensor_def warns it will stop resolving resources
    # The sensor's partitioned jobs resolve their dynamic partitions against this instance.
    with dg.partition_loading_context(dynamic_partitions_store=instance):
        context = dg.build_sensor_context(
            instance=instance, instance_ref=instance.get_ref(), definitions=defs, cursor=cursor,
            resources=dict(resources or {}),
        )
        result = sensor.evaluate_tick(context)
    apply_partitions_requests(instance, result.dynamic_partitions_requests or [])
    return Tick([_with_job_name(r, sensor) for r in result.run_requests or []], result.cursor)


def _with_job_name(request: dg.RunRequest, sensor: dg.SensorDefinition) -> dg.RunRequest:
    if request.job_name:
        return request
    # A sensor with a single job may leave job_name out; the daemon fills it in the same way.
    return request.with_replaced_attrs(job_name=sensor.job_name)


def run_requests(defs: dg.Definitions, instance: dg.DagsterInstance, requests: Sequence[dg.RunRequest], *,
                 log_level: str = "WARNING", status: Status = nullcontext) -> Iterator[RunOutcome]:
    """Run each request in-process, one after the other, yielding each outcome as it ends
    (a failed run is an outcome, never an exception: the caller reports it and goes on)."""
    for request in requests:
        if not request.job_name:
            raise ValueError(f"run request {request.run_key or request.partition_key} names no job")
        job = defs.resolve_job_def(request.job_name)
        label = request.partition_key or request.job_name
        with status(f"running {request.job_name} {label}"):
            result = job.execute_in_process(
                run_config={**request.run_config, **log_level_config(log_level)},
                partition_key=request.partition_key, instance=instance, tags=request.tags,
                asset_selection=list(request.asset_selection) if request.asset_selection else None,
                raise_on_error=False,
            )
        yield RunOutcome(request, request.job_name, label, result)
