"""`incoming_studies`: turns groups of spool files into runs — ingest and segmentation
together while a production model exists, else ingest alone.

A new study gets its run as soon as its first files are seen (`early_start`, the default):
the run starts up (process, imports, and with a model the predictor's imports) while the study
still arrives, waits in its ingest step until the files have been quiet for the quiet period,
then ingests and segments. Start-up overlaps the quiet period instead of following it, on a
laptop (seconds) as on Kubernetes (a pod). New studies first seen in the same tick share one
run over their partition range. Anything else — files of a study that is already a partition
(late instances), what a finished early run left, `early_start` off — gets a run once quiet,
with its file list: one run per study, or one over the range of new studies that settle
together (a burst), up to STUDIES_PER_RUN per run. A burst run that fails for good is split:
each of its studies gets a run of its own, so one bad study holds up no other."""


import hashlib
import json
import time

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    WILL_RETRY_TAG,
)

from kaapana_assets.ingest.assets import STUDIES_PER_RUN, ingest_study_job, quarantine_job
from kaapana_assets.ingest.partitions import STUDIES, studies_partitions
from kaapana_assets.ingest.spool import UNREADABLE, SpoolPlan, plan_spool, scan_spool
from kaapana_assets.nnunet.registry import find_version
from kaapana_assets.segmentation.assets import ingest_and_segment_job
from kaapana_assets.segmentation.models import PREDICTION_IMPORTS
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
EARLY_TAG = "kaapana/early"  # a run started as its studies began to arrive


def _burst_id(digests: list[str]) -> str:
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def _failed_for_good(instance: dg.DagsterInstance, run_id: str, tag: str = BURST_TAG) -> bool | None:
    """None while the run tagged `tag: run_id` (or its retry) may still succeed; else whether
    it failed."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={tag: run_id}), limit=1)  # newest: a retry
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
    version = find_version(mlflow.tracking(), nnunet_settings.segmentation_model_name())
    return None if version is None else str(version.version)


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
    cursor = json.loads(context.cursor) if context.cursor else {}
    known = {path: tuple(v) for path, v in cursor.get("files", {}).items()}
    requested: dict[str, str] = cursor.get("requested", {})

    # Runs started early, checked before the scan: while one runs, its studies get no other
    # run; once it ended, what of them is still in the spool goes the quiet-period way.
    early: dict[str, list[str]] = cursor.get("early", {})
    in_flight: set[str] = set()
    for tag, studies in list(early.items()):
        if _failed_for_good(context.instance, tag, EARLY_TAG) is None:
            in_flight.update(studies)
        else:
            del early[tag]

    previous_scan_ns = cursor.get("scanned_ns")
    now_ns, spool_files = time.time_ns(), scan_spool(archive.spool)
    plan = plan_spool(spool_files, known, now_ns, archive.quiet_period_s, previous_scan_ns)
    # New studies still arriving: their run starts now (ready ones take the path below, with
    # their file list).
    fresh = [s for s in sorted(plan.waiting) if s != UNREADABLE and s not in in_flight
             and not context.instance.has_dynamic_partition(STUDIES, s)] if archive.early_start else []
    waiting = [s for s in plan.waiting if s != UNREADABLE and s not in in_flight and s not in fresh]

    def pending_of(plan: SpoolPlan) -> list[str]:
        return [s for s in sorted(plan.ready) if requested.get(s) != plan.digests[s] and s not in in_flight]

    pending = pending_of(plan)
    if pending and any(0 < plan.settles_in_s[s] <= BURST_JOIN_S for s in waiting):
        plan = plan_spool(spool_files, plan.studies_of, now_ns + int(BURST_JOIN_S * 1e9), archive.quiet_period_s)
        pending = [s for s in pending_of(plan) if s not in fresh]

    run_requests: list[dg.RunRequest] = []
    about_to_settle = [s for s in waiting if s in plan.waiting and plan.settles_in_s[s] <= BURST_WINDOW_S]
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
    if pending or split or fresh:
        try:
            model_version = production_version(mlflow, nnunet_settings)
            if model_version is not None:
                job = ingest_and_segment_job
        except Exception as exc:  # noqa: BLE001  MLflow unreachable: ingest now, the automation segments later
            context.log.warning(f"production model unknown ({exc!r}): ingesting without segmenting")

    def run_config(files: list[str], **ingest: object) -> dict:
        ops: dict = {"dicom_studies": {"config": {"files": files, **ingest}}}
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

    # Early runs: no file list (the files are still coming); the run waits for quiet itself
    # and meanwhile imports what segmenting needs.
    for start in range(0, len(fresh), STUDIES_PER_RUN):
        chunk = fresh[start:start + STUDIES_PER_RUN]
        tag = _burst_id([f"{s}@{now_ns}" for s in chunk])
        config = run_config([], await_quiet_s=archive.quiet_period_s, arrived_after_ns=previous_scan_ns or 0,
                            warm_imports=list(PREDICTION_IMPORTS) if model_version is not None else [])
        tags = {EARLY_TAG: tag, "kaapana/studies": str(len(chunk))}
        if len(chunk) > 1:
            tags |= {ASSET_PARTITION_RANGE_START_TAG: chunk[0], ASSET_PARTITION_RANGE_END_TAG: chunk[-1]}
        run_requests.append(dg.RunRequest(job_name=job.name, partition_key=chunk[0] if len(chunk) == 1 else None,
                                          run_key=f"early:{tag}", run_config=config, tags=tags))
        early[tag] = chunk

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
        "early": early,
        "scanned_ns": now_ns,
    }
    skip = None
    if not run_requests:
        settling = [s for s in plan.waiting if s not in in_flight]
        skip = (
            f"waiting for {len(settling)} stud(ies) to settle" if settling
            else f"{len(in_flight)} stud(ies) in runs started as they arrived" if in_flight
            else "no new complete study in the spool"
        )
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[studies_partitions.build_add_request(fresh + new_partitions)]
        if fresh or new_partitions else [],
        cursor=json.dumps(cursor),
        skip_reason=skip,
    )
