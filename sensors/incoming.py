"""`incoming_studies`: turns quiet groups of spool files into runs — ingest and segmentation
together while a production model exists, else ingest alone. A study that arrives alone gets
its own run; new studies that settle in the same tick (a burst) share one run over their
partition range, up to STUDIES_PER_RUN per run: one process start and one model load for all of
them. A burst run that fails for good is split: each of its studies gets a run of its own, so
one bad study holds up no other."""


import hashlib
import json
import time
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    WILL_RETRY_TAG,
)

from kaapana_assets.ingest.assets import STUDIES_PER_RUN, ingest_study_job, quarantine_job
from kaapana_assets.ingest.partitions import STUDIES, studies_partitions
from kaapana_assets.ingest.spool import UNREADABLE, plan_spool, scan_spool
from kaapana_assets.segmentation.assets import ingest_and_segment_job
from kaapana_assets.training.tracking import PRODUCTION
from resources.mlflow import MlflowResource
from resources.nnunet import NnunetResource
from resources.storage import ArchiveResource

# Studies copied one after the other settle a little apart (their last writes): those settling
# within BURST_JOIN_S of a ready one are ready with it (their quiet period is at most that much
# shorter); a ready study waits up to BURST_WINDOW_S (the next tick) for others about to
# settle. Either way a burst becomes one run rather than several.
BURST_JOIN_S = 1.0
BURST_WINDOW_S = 3.0
BURST_TAG = "kaapana/burst"


def _burst_id(digests: list[str]) -> str:
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def _failed_for_good(instance: dg.DagsterInstance, burst: str) -> bool | None:
    """None while the burst's run (or its retry) may still succeed; else whether it failed."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={BURST_TAG: burst}), limit=1)  # newest: a retry
    if not runs:
        return None
    run = runs[0]
    if run.status == dg.DagsterRunStatus.SUCCESS:
        return False
    if run.status == dg.DagsterRunStatus.CANCELED:
        return True
    if run.status == dg.DagsterRunStatus.FAILURE:
        # With run retries on, the failure is final once the instance has decided not to retry.
        return not instance.run_retries_enabled or run.tags.get(WILL_RETRY_TAG) == "false"
    return None


def production_version(mlflow: MlflowResource, nnunet_settings: NnunetResource) -> str | None:
    """The segmentation model's `production` version, if any. A site whose sqlite store does
    not exist yet has none (and asking would create the store)."""
    tracking = mlflow.tracking()
    if tracking.tracking_uri.startswith("sqlite:///") and not Path(tracking.tracking_uri[len("sqlite:///"):]).exists():
        return None
    version = tracking.version_by_alias(nnunet_settings.segmentation_model_name(), PRODUCTION)
    return None if version is None else str(version.version)


# The daemon evaluates sensors at most every 5 s (its loop); an interval below that makes every
# loop evaluate this one (an interval of exactly 5 s skips a loop now and then: +5 s of latency).
@dg.sensor(
    jobs=[ingest_and_segment_job, ingest_study_job, quarantine_job],
    minimum_interval_seconds=1,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the spool; once a study's files are quiet, requests one run that ingests it and, "
    "while a production model exists, segments it (studies that settle together: one run over their range).",
)
def incoming_studies(
    context: dg.SensorEvaluationContext, archive: ArchiveResource, mlflow: MlflowResource,
    nnunet_settings: NnunetResource,
) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    known = {path: tuple(v) for path, v in cursor.get("files", {}).items()}
    requested: dict[str, str] = cursor.get("requested", {})

    now_ns, spool_files = time.time_ns(), scan_spool(archive.spool)
    plan = plan_spool(spool_files, known, now_ns, archive.quiet_period_s, cursor.get("scanned_ns"))
    pending = [s for s in sorted(plan.ready) if requested.get(s) != plan.digests[s]]
    if pending and any(0 < plan.settles_in_s[s] <= BURST_JOIN_S for s in plan.waiting if s != UNREADABLE):
        plan = plan_spool(spool_files, plan.studies_of, now_ns + int(BURST_JOIN_S * 1e9), archive.quiet_period_s)
        pending = [s for s in sorted(plan.ready) if requested.get(s) != plan.digests[s]]

    run_requests: list[dg.RunRequest] = []
    about_to_settle = [s for s in plan.waiting if s != UNREADABLE and plan.settles_in_s[s] <= BURST_WINDOW_S]
    if pending and about_to_settle and max(-plan.settles_in_s[s] for s in pending) < BURST_WINDOW_S:
        pending = []  # next tick, together with them
    new_partitions = [s for s in pending if not context.instance.has_dynamic_partition(STUDIES, s)]

    # Bursts whose run failed for good: one run per study (what is indexed already is reused).
    bursts: dict[str, list[str]] = cursor.get("bursts", {})
    split: list[tuple[str, str]] = []  # (study, burst)
    for burst, studies in list(bursts.items()):
        failed = _failed_for_good(context.instance, burst)
        if failed is not None:
            del bursts[burst]
            if failed:
                context.log.warning(f"burst run {burst} failed: its {len(studies)} studies get a run each")
                split += [(study_uid, burst) for study_uid in studies]

    job, model_version = ingest_study_job, None
    if pending or split:
        try:
            model_version = production_version(mlflow, nnunet_settings)
            if model_version is not None:
                job = ingest_and_segment_job
        except Exception as exc:  # noqa: BLE001  MLflow unreachable: ingest now, the automation segments later
            context.log.warning(f"production model unknown ({exc!r}): ingesting without segmenting")

    def run_config(files: list[str]) -> dict:
        ops: dict = {"dicom_studies": {"config": {"files": files}}}
        if model_version is not None:
            # The version seen now: the run loads it from the site's model cache without
            # opening the registry again, and its config records which model segmented.
            ops["segmentations"] = {"config": {"model_version": model_version}}
        return {"ops": ops}

    def single(study_uid: str, files: list[str], run_key: str) -> dg.RunRequest:
        return dg.RunRequest(
            job_name=job.name,
            partition_key=study_uid,
            run_key=run_key,
            run_config=run_config(files),
            tags={"kaapana/files": str(len(files))},
        )

    for study_uid, burst in split:
        run_requests.append(single(study_uid, plan.ready.get(study_uid, []), f"{study_uid}:after-burst:{burst}"))

    # New partitions are added in this order, so consecutive new studies form a partition range.
    for start in range(0, len(new_partitions), STUDIES_PER_RUN):
        chunk = new_partitions[start:start + STUDIES_PER_RUN]
        if len(chunk) < 2:
            continue
        burst = _burst_id([plan.digests[s] for s in chunk])
        files = [f for s in chunk for f in plan.ready[s]]
        run_requests.append(
            dg.RunRequest(
                job_name=job.name,
                run_key=f"burst:{burst}",
                run_config=run_config(files),
                tags={ASSET_PARTITION_RANGE_START_TAG: chunk[0], ASSET_PARTITION_RANGE_END_TAG: chunk[-1],
                      BURST_TAG: burst, "kaapana/studies": str(len(chunk)), "kaapana/files": str(len(files))},
            )
        )
        bursts[burst] = chunk
        for study_uid in chunk:
            requested[study_uid] = plan.digests[study_uid]
    for study_uid in pending:
        if requested.get(study_uid) == plan.digests[study_uid]:
            continue  # in a burst above
        digest = plan.digests[study_uid]
        run_requests.append(single(study_uid, plan.ready[study_uid], f"{study_uid}:{digest}"))
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
        "bursts": bursts,
        "scanned_ns": now_ns,
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
