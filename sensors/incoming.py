"""`incoming_studies`: turns quiet groups of spool files into one run per study — ingest and
segmentation together while a production model exists, else ingest alone."""


import json
import time
from pathlib import Path

import dagster as dg

from kaapana_assets.ingest.assets import ingest_study_job, quarantine_job
from kaapana_assets.ingest.partitions import STUDIES, studies_partitions
from kaapana_assets.ingest.spool import UNREADABLE, plan_spool, scan_spool
from kaapana_assets.segmentation.assets import ingest_and_segment_job
from kaapana_assets.training.tracking import PRODUCTION
from resources.mlflow import MlflowResource
from resources.nnunet import NnunetResource
from resources.storage import ArchiveResource


def has_production_model(mlflow: MlflowResource, nnunet_settings: NnunetResource) -> bool:
    """Whether the segmentation model has a `production` version. A site whose sqlite store
    does not exist yet has none (and asking would create the store)."""
    tracking = mlflow.tracking()
    if tracking.tracking_uri.startswith("sqlite:///") and not Path(tracking.tracking_uri[len("sqlite:///"):]).exists():
        return False
    return tracking.version_by_alias(nnunet_settings.segmentation_model_name(), PRODUCTION) is not None


# The daemon evaluates sensors at most every 5 s (its loop); an interval below that makes every
# loop evaluate this one (an interval of exactly 5 s skips a loop now and then: +5 s of latency).
@dg.sensor(
    jobs=[ingest_and_segment_job, ingest_study_job, quarantine_job],
    minimum_interval_seconds=1,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the spool; once a study's files are quiet, requests one run that ingests it and, "
    "while a production model exists, segments it.",
)
def incoming_studies(
    context: dg.SensorEvaluationContext, archive: ArchiveResource, mlflow: MlflowResource,
    nnunet_settings: NnunetResource,
) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    known = {path: tuple(v) for path, v in cursor.get("files", {}).items()}
    requested: dict[str, str] = cursor.get("requested", {})

    plan = plan_spool(scan_spool(archive.spool), known, time.time_ns(), archive.quiet_period_s)

    run_requests: list[dg.RunRequest] = []
    new_partitions = [s for s in plan.ready if not context.instance.has_dynamic_partition(STUDIES, s)]
    job = ingest_study_job
    if any(requested.get(s) != plan.digests[s] for s in plan.ready):
        try:
            if has_production_model(mlflow, nnunet_settings):
                job = ingest_and_segment_job
        except Exception as exc:  # noqa: BLE001  MLflow unreachable: ingest now, the automation segments later
            context.log.warning(f"production model unknown ({exc!r}): ingesting without segmenting")
    for study_uid, files in sorted(plan.ready.items()):
        digest = plan.digests[study_uid]
        if requested.get(study_uid) == digest:
            continue  # this exact file set was already requested; its run will clear it
        run_requests.append(
            dg.RunRequest(
                job_name=job.name,
                partition_key=study_uid,
                run_key=f"{study_uid}:{digest}",
                run_config={"ops": {"dicom_studies": {"config": {"files": files}}}},
                tags={"kaapana/files": str(len(files))},
            )
        )
        requested[study_uid] = digest
    if plan.unreadable and requested.get(UNREADABLE) != plan.digests[UNREADABLE]:
        run_requests.append(
            dg.RunRequest(
                job_name=quarantine_job.name,
                run_key=f"quarantine:{plan.digests[UNREADABLE]}",
                run_config={"ops": {"quarantine": {"config": {"files": plan.unreadable}}}},
            )
        )
        requested[UNREADABLE] = plan.digests[UNREADABLE]

    # Forget what left the spool, so the cursor stays as small as the spool.
    present = set(plan.ready) | set(plan.waiting) | ({UNREADABLE} if plan.unreadable else set())
    cursor = {
        "files": {p: list(v) for p, v in plan.studies_of.items()},
        "requested": {k: v for k, v in requested.items() if k in present},
    }
    skip = None
    if not run_requests:
        skip = (
            f"waiting for {len(plan.waiting)} stud(ies) to settle" if plan.waiting else "no new complete study in the spool"
        )
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[studies_partitions.build_add_request(new_partitions)] if new_partitions else [],
        cursor=json.dumps(cursor),
        skip_reason=skip,
    )
