"""`federated_round_chain`: round r done → request round r+1; the last round done → register
the model. Round r reads global r-1 from the hub's federation folder, and Dagster cannot
express a round depending on the previous round of the same asset (self-dependencies need
time partitions): this sensor chains them."""

import dagster as dg

from kaapana_assets.federated.assets import federated_model_job, federated_round_job
from kaapana_assets.federated.partitions import round_key
from resources.federation import FederationResource


@dg.sensor(jobs=[federated_round_job, federated_model_job], default_status=dg.DefaultSensorStatus.RUNNING,
           minimum_interval_seconds=15,
           description="Round r done → request round r+1; last round done → register the model.")
def federated_round_chain(context: dg.SensorEvaluationContext, federation: FederationResource) -> dg.SensorResult:
    if context.cursor is None:
        # First tick: start from now. Replaying history would re-run rounds that are done.
        latest = context.instance.fetch_materializations(dg.AssetKey("federated_rounds"), limit=1).records
        return dg.SensorResult(cursor=str(latest[0].storage_id if latest else 0))
    after = int(context.cursor)
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("federated_rounds"), after_storage_id=after),
        limit=100, ascending=True).records
    requests = []
    for record in records:
        partition = record.partition_key
        if not partition:
            continue
        experiment, round_ = partition.split("|")
        try:
            rounds = int(federation.store().read_json(experiment, "experiment")["rounds"])
        except (FileNotFoundError, KeyError, ValueError) as exc:
            context.log.warning(f"{experiment}: {exc}")
            continue
        if int(round_) < rounds:
            requests.append(dg.RunRequest(run_key=f"{partition}→{record.storage_id}", job_name=federated_round_job.name,
                                          partition_key=round_key(experiment, int(round_) + 1)))
        else:
            requests.append(dg.RunRequest(run_key=f"{experiment}|model→{record.storage_id}",
                                          job_name=federated_model_job.name, partition_key=experiment))
    cursor = str(max([after, *(r.storage_id for r in records)]))
    return dg.SensorResult(run_requests=requests, cursor=cursor)
