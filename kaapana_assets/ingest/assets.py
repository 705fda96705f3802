"""Dagster wiring of ingestion. The work happens in plain modules (pipeline, study)."""


import json
import time
from collections.abc import Iterator

import dagster as dg
from pydantic import Field

from kaapana_assets.ingest.partitions import studies_partitions
from kaapana_assets.ingest.pipeline import IngestReport, ingest_files
from kaapana_assets.ingest.spool import find_study_files, wait_until_quiet
from kaapana_assets.ingest.study import (
    combined_version,
    middle_slice_png,
    png_markdown,
    preview_series_paths,
    summarize_study,
)
from kaapana_assets.lake.schemas import QUARANTINE
from kaapana_assets.metadata_table import columns, links_markdown, table
from kaapana_assets.preload import warm_in_background
from kaapana_assets.progress import Progress, throttled
from kaapana_assets.projects.assignment import ProjectSource
from resources.storage import ArchiveResource, LakeResource
from resources.viewer import ViewerResource

SERIES_SCHEMA = columns(
    ("series", "string", "series description, else the tail of its SeriesInstanceUID"),
    ("modality", "string"),
    ("instances", "int"),
    ("slice_thickness_mm", "float"),
    ("complete", "bool"),
    ("reference_segs", "int", "reference DICOM SEG series pointing at this series"),
)


class IngestConfig(dg.Config):
    files: list[str] = Field(
        default_factory=list,
        description="Spool files to ingest (the sensor passes them); empty: find the study's files in the spool",
    )
    await_quiet_s: float = Field(
        default=0.0,
        description="Wait, before ingesting, until the studies' spool files have been unchanged this long. The "
        "incoming sensor sets it (the quiet period) when it starts a run as a study begins to arrive, so that the "
        "run's start-up overlaps the quiet period. 0: ingest at once",
    )
    arrived_after_ns: int = Field(
        default=0, description="The sensor's scan before the one that first saw the studies (ns since the epoch)",
    )
    max_wait_s: float = Field(
        default=600.0,
        description="A study still arriving after this long is left to the sensor's next run (this one materializes "
        "nothing)",
    )
    warm_imports: list[str] = Field(
        default_factory=list,
        description="Modules the rest of the run needs (e.g. the predictor's), imported in the background while the "
        "run waits; `module:function` also calls that function (a first-use cost, e.g. a table loaded once)",
    )


def _progress(context: dg.AssetExecutionContext, label: str) -> Progress:
    # A line per quarter: enough to see a large study move, not a line per chunk.
    return throttled(lambda done, total: context.log.info(f"{label}: {done}/{total} files parsed"), step=0.25)


def _report_metadata(report: IngestReport) -> dict[str, dg.MetadataValue]:
    return {
        "new_instances": dg.MetadataValue.int(report.count("indexed")),
        "already_indexed": dg.MetadataValue.int(report.count("already_indexed")),
        "quarantined": dg.MetadataValue.int(report.count("quarantined")),
        "quarantine_reasons": dg.MetadataValue.json(report.reasons),
        "delta_versions": dg.MetadataValue.json(report.versions),
    }


STUDIES_SCHEMA = columns(
    ("study_uid", "string"),
    ("patient_id", "string"),
    ("instances", "int"),
    ("series_count", "int"),
    ("modalities", "string"),
)

# A run covers one study, or a burst of studies that arrived together (the incoming sensor's
# partition ranges; a UI backfill in batches of the same size): one process start for all.
STUDIES_PER_RUN = 10


@dg.asset(
    partitions_def=studies_partitions,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=STUDIES_PER_RUN),
    group_name="ingest",
    kinds={"dicom", "deltalake"},
    # A run started while its studies arrive materializes nothing if they are still arriving
    # at max_wait_s: the sensor's quiet-period run takes them over (segmentations is skipped).
    output_required=False,
    description="A DICOM study: validated, archived and indexed in the instances/series/studies Delta tables.",
)
def dicom_studies(
    context: dg.AssetExecutionContext, config: IngestConfig, lake: LakeResource, archive: ArchiveResource,
    viewer: ViewerResource,
) -> Iterator[dg.MaterializeResult]:
    study_uids = list(context.partition_keys)
    label = study_uids[0] if len(study_uids) == 1 else f"{len(study_uids)} studies"
    if config.await_quiet_s > 0 and not config.files:
        warm_in_background(config.warm_imports)
        started = time.monotonic()
        context.log.info(f"{label}: arriving; ingesting once the files have been unchanged for "
                         f"{config.await_quiet_s:g} s (at most {config.max_wait_s:g} s of waiting)")
        settled = wait_until_quiet(archive.spool, study_uids, config.await_quiet_s, config.max_wait_s,
                                   config.arrived_after_ns or None)
        if settled is None:
            context.log.warning(f"{label}: still arriving after {config.max_wait_s:.0f} s; the incoming sensor "
                                "requests a run once the files are quiet")
            return
        files = [f for study_files in settled.values() for f in study_files]
        context.log.info(f"{label}: quiet for {config.await_quiet_s:g} s after {time.monotonic() - started:.1f} s "
                         "of waiting")
    else:
        files = config.files or [f for study_uid in study_uids for f in find_study_files(archive.spool, study_uid)]
    yield from _ingest(context, study_uids, label, files, lake, archive, viewer)


def _ingest(context: dg.AssetExecutionContext, study_uids: list[str], label: str, files: list[str],
            lake: LakeResource, archive: ArchiveResource, viewer: ViewerResource) -> Iterator[dg.MaterializeResult]:
    the_lake = lake.lake()
    context.log.info(f"{label}: {len(files)} spool file(s)")
    # One ingest for the whole run: its commits are per batch of files, not per study.
    report = ingest_files(
        files,
        archive.open(the_lake),
        workers=archive.ingest_workers,
        progress=_progress(context, label),
        projects=ProjectSource(spool=archive.spool),
    )
    summaries = {study_uid: summarize_study(the_lake, study_uid) for study_uid in study_uids}
    missing = [study_uid for study_uid, summary in summaries.items() if summary is None]
    if missing:
        # Every other study of the run is indexed already: a rerun (or the sensor's split of a
        # failed burst) finds them and fails only for these.
        raise dg.Failure(
            description=f"No instance of study {', '.join(missing)} is indexed: {report.count('quarantined')} "
            f"file(s) quarantined ({json.dumps(report.reasons)}), {report.count('failed')} unreadable.",
            metadata=_report_metadata(report),
        )
    indexed = [summary for summary in summaries.values() if summary is not None]
    if len(indexed) > 1:
        yield dg.MaterializeResult(
            metadata={
                "studies": table([{"study_uid": s.study_uid, "patient_id": s.patient_id or "",
                                   "instances": s.instance_count, "series_count": len(s.series),
                                   "modalities": ", ".join(s.modalities)} for s in indexed], STUDIES_SCHEMA),
                "study_count": dg.MetadataValue.int(len(indexed)),
                "instances": dg.MetadataValue.int(sum(s.instance_count for s in indexed)),
                "viewer": links_markdown([(s.study_uid, viewer.study(s.study_uid)) for s in indexed]),
                **_report_metadata(report),
            },
            data_version=dg.DataVersion(combined_version([s.data_version for s in indexed])),
        )
        return
    summary = indexed[0]
    study_uid = summary.study_uid
    metadata: dict[str, dg.MetadataValue] = {
        "study_uid": dg.MetadataValue.text(study_uid),
        "viewer": viewer.study(study_uid),
        "patient_id": dg.MetadataValue.text(summary.patient_id or ""),
        "instances": dg.MetadataValue.int(summary.instance_count),
        "series_count": dg.MetadataValue.int(len(summary.series)),
        "modalities": dg.MetadataValue.text(", ".join(summary.modalities)),
        "series": table(summary.series_rows(), SERIES_SCHEMA),
        **_report_metadata(report),
    }
    # Each SEG that references one of the study's series, over that series.
    segs = [(seg_uid, s["series_uid"]) for s in summary.series for seg_uid in s.get("reference_seg_series_uids") or []]
    if segs:
        metadata["segs_in_viewer"] = links_markdown([(f"SEG …{seg_uid[-12:]} over …{series_uid[-12:]}",
                                                      viewer.segmentation(study_uid, series_uid, seg_uid))
                                                     for seg_uid, series_uid in segs])
    png = middle_slice_png(preview_series_paths(the_lake, archive.kaapana_home().archive, summary))
    if png:
        metadata["preview"] = dg.MetadataValue.md(png_markdown(png, f"middle slice of {study_uid}"))
    yield dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(summary.data_version))


class QuarantineConfig(dg.Config):
    files: list[str] = Field(default_factory=list, description="Unreadable spool files to quarantine")


@dg.asset(
    group_name="ingest",
    kinds={"dicom", "deltalake"},
    description="Spool files whose header cannot be read or validated, moved to quarantine with a reason.",
)
def quarantine(
    context: dg.AssetExecutionContext, config: QuarantineConfig, lake: LakeResource, archive: ArchiveResource
) -> dg.MaterializeResult:
    # The same code path as any ingest: it indexes what it can and quarantines the rest.
    report = ingest_files(config.files, archive.open(lake.lake()), workers=1,
                          projects=ProjectSource(spool=archive.spool))
    for f in report.files:
        if f.status == "quarantined":
            context.log.warning(f"quarantined {f.source}: {f.reason}: {f.error}")
    total = lake.lake().read(QUARANTINE).height
    return dg.MaterializeResult(
        metadata={**_report_metadata(report), "quarantine_total": dg.MetadataValue.int(total)},
        data_version=dg.DataVersion(str(report.versions.get("quarantine"))),
    )


ingest_study_job = dg.define_asset_job(
    "ingest_study", selection=[dicom_studies],
    # One step: in-process saves a second process start (and its imports) per study.
    executor_def=dg.in_process_executor,
    description="Ingest a study, or a burst of studies (a partition range), from the spool (the incoming_studies "
    "sensor requests it while no production model exists; else ingest_and_segment).",
)
quarantine_job = dg.define_asset_job(
    "quarantine_unreadable", selection=[quarantine], description="Quarantine unreadable spool files."
)

defs = dg.Definitions(assets=[dicom_studies, quarantine], jobs=[ingest_study_job, quarantine_job])
