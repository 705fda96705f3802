"""`incoming_studies`: turns quiet groups of spool files into one ingest run per study."""


import json
import time

import dagster as dg

from kaapana_assets.ingest.assets import ingest_study_job, quarantine_job
from kaapana_assets.ingest.partitions import STUDIES, studies_partitions
from kaapana_assets.ingest.spool import UNREADABLE, plan_spool, scan_spool
from resources.storage import ArchiveResource


@dg.sensor(
    jobs=[ingest_study_job, quarantine_job],
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the spool; requests one ingest run per study once its files are quiet.",
)
def incoming_studies(context: dg.SensorEvaluationContext, archive: ArchiveResource) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    known = {path: tuple(v) for path, v in cursor.get("files", {}).items()}
    requested: dict[str, str] = cursor.get("requested", {})

    plan = plan_spool(scan_spool(archive.spool), known, time.time_ns(), archive.quiet_period_s)

    run_requests: list[dg.RunRequest] = []
    new_partitions = [s for s in plan.ready if not context.instance.has_dynamic_partition(STUDIES, s)]
    for study_uid, files in sorted(plan.ready.items()):
        digest = plan.digests[study_uid]
        if requested.get(study_uid) == digest:
            continue  # this exact file set was already requested; its run will clear it
        run_requests.append(
            dg.RunRequest(
                job_name=ingest_study_job.name,
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
