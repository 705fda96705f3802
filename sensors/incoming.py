"""`incoming_studies`: turns groups of spool files into runs — ingest and segmentation
together while a production model exists, else ingest alone. Thin: it scans the spool, asks
the instance what it knows (partitions, how the runs it waits for ended), and leaves the
arrival rules to kaapana_assets/ingest/arrivals.py."""


import time

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    WILL_RETRY_TAG,
)

from kaapana_assets.ingest.arrivals import (
    ArrivalCursor,
    ArrivalRules,
    PlannedRun,
    RunKind,
    RunOutcome,
    SpoolScan,
    plan_runs,
    read_studies,
)
from kaapana_assets.ingest.assets import STUDIES_PER_RUN, ingest_study_job, quarantine_job
from kaapana_assets.ingest.partitions import STUDIES, studies_partitions
from kaapana_assets.ingest.spool import UNREADABLE, scan_spool
from kaapana_assets.nnunet.registry import find_version
from kaapana_assets.segmentation.assets import ingest_and_segment_job
from kaapana_assets.segmentation.models import PREDICTION_IMPORTS
from resources.mlflow import MlflowResource
from resources.nnunet import NnunetResource
from resources.storage import ArchiveResource

BURST_TAG = "kaapana/burst"
EARLY_TAG = "kaapana/early"  # a run started as its studies began to arrive


def _outcome(instance: dg.DagsterInstance, run_id: str, tag: str) -> RunOutcome:
    """How the run tagged `tag: run_id` (or its retry) stands."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={tag: run_id}), limit=1)  # newest: a retry
    if not runs:
        return RunOutcome.PENDING
    run = runs[0]
    if run.status == dg.DagsterRunStatus.SUCCESS:
        return RunOutcome.SUCCEEDED
    if run.status == dg.DagsterRunStatus.CANCELED:
        return RunOutcome.FAILED
    if run.status == dg.DagsterRunStatus.FAILURE:
        # With run retries on, the failure is final once the instance has decided not to retry.
        final = not instance.run_retries_enabled or run.tags.get(WILL_RETRY_TAG) == "false"
        return RunOutcome.FAILED if final else RunOutcome.PENDING
    return RunOutcome.PENDING


def production_version(mlflow: MlflowResource, nnunet_settings: NnunetResource) -> str | None:
    """The segmentation model's `production` version, if any. A site whose sqlite store does
    not exist yet has none (and asking would create the store)."""
    version = find_version(mlflow.tracking(), nnunet_settings.segmentation_model_name())
    return None if version is None else str(version.version)


def _run_request(run: PlannedRun, job_name: str, model_version: str | None) -> dg.RunRequest:
    if run.kind is RunKind.QUARANTINE:
        return dg.RunRequest(job_name=quarantine_job.name, run_key=run.run_key,
                             run_config={"ops": {"quarantine": {"config": {"files": list(run.files)}}}})
    ingest: dict = {"files": list(run.files)}
    if run.kind is RunKind.EARLY:
        # No file list (the files are still coming): the run waits for quiet itself and
        # meanwhile imports what segmenting needs.
        ingest |= {"await_quiet_s": run.await_quiet_s, "arrived_after_ns": run.arrived_after_ns,
                   "warm_imports": list(PREDICTION_IMPORTS) if model_version is not None else []}
    ops: dict = {"dicom_studies": {"config": ingest}}
    if model_version is not None:
        # The version seen now: the run loads it from the site's model cache without opening
        # the registry again, and its config records which model segmented.
        ops["segmentations"] = {"config": {"model_version": model_version}}
    tags: dict[str, str] = {}
    if len(run.studies) > 1:
        tags |= {ASSET_PARTITION_RANGE_START_TAG: run.studies[0], ASSET_PARTITION_RANGE_END_TAG: run.studies[-1]}
    if run.kind is RunKind.EARLY:
        tags |= {EARLY_TAG: run.tag, "kaapana/studies": str(len(run.studies))}
    elif run.kind is RunKind.BURST:
        tags |= {BURST_TAG: run.tag, "kaapana/studies": str(len(run.studies)), "kaapana/files": str(len(run.files))}
    else:
        tags |= {"kaapana/files": str(len(run.files))}
    return dg.RunRequest(job_name=job_name, partition_key=run.studies[0] if len(run.studies) == 1 else None,
                         run_key=run.run_key, run_config={"ops": ops}, tags=tags)


# The daemon evaluates sensors at most every 5 s (its loop); an interval below that makes every
# loop evaluate this one (an interval of exactly 5 s skips a loop now and then: +5 s of latency).
@dg.sensor(
    jobs=[ingest_and_segment_job, ingest_study_job, quarantine_job],
    minimum_interval_seconds=1,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the spool; requests a new study's run as it arrives — the run waits until the files are "
    "quiet, then ingests the study and, while a production model exists, segments it (studies seen together: one "
    "run over their range). Late files of a known study get a run once quiet.",
)
def incoming_studies(
    context: dg.SensorEvaluationContext, archive: ArchiveResource, mlflow: MlflowResource,
    nnunet_settings: NnunetResource,
) -> dg.SensorResult:
    instance = context.instance
    cursor = ArrivalCursor.from_json(context.cursor)
    now_ns, files = time.time_ns(), scan_spool(archive.spool)
    studies = read_studies(files, cursor)
    scan = SpoolScan(
        files=tuple(files), studies=studies,
        partitions=frozenset(s for s in set(studies.values()) - {UNREADABLE} if instance.has_dynamic_partition(STUDIES, s)),
        runs={**{tag: _outcome(instance, tag, EARLY_TAG) for tag in cursor.early},
              **{burst: _outcome(instance, burst, BURST_TAG) for burst in cursor.bursts}},
    )
    plan = plan_runs(cursor, scan, now_ns, ArrivalRules(archive.quiet_period_s, archive.early_start, STUDIES_PER_RUN))
    for burst, failed in plan.failed_bursts.items():
        context.log.warning(f"burst run {burst} failed: its {len(failed)} studies get a run each")

    job, model_version = ingest_study_job, None
    if any(run.kind is not RunKind.QUARANTINE for run in plan.runs):
        try:
            model_version = production_version(mlflow, nnunet_settings)
            if model_version is not None:
                job = ingest_and_segment_job
        except Exception as exc:  # noqa: BLE001  MLflow unreachable: ingest now, the automation segments later
            context.log.warning(f"production model unknown ({exc!r}): ingesting without segmenting")
    return dg.SensorResult(
        run_requests=[_run_request(run, job.name, model_version) for run in plan.runs],
        dynamic_partitions_requests=[studies_partitions.build_add_request(plan.new_partitions)]
        if plan.new_partitions else [],
        cursor=plan.cursor.to_json(),
        skip_reason=plan.skip_reason,
    )
