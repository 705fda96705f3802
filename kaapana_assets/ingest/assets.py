"""Dagster wiring of ingestion. The work happens in plain modules (pipeline, study)."""


import json

import dagster as dg
from pydantic import Field

from kaapana_assets.ingest.partitions import studies_partitions
from kaapana_assets.ingest.pipeline import IngestReport, ingest_files
from kaapana_assets.ingest.spool import find_study_files
from kaapana_assets.ingest.study import (
    middle_slice_png,
    png_markdown,
    preview_series_paths,
    summarize_study,
)
from kaapana_assets.metadata_table import columns, table
from kaapana_assets.progress import Progress, throttled
from resources.storage import ArchiveResource, LakeResource

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


@dg.asset(
    partitions_def=studies_partitions,
    group_name="ingest",
    kinds={"dicom", "deltalake"},
    description="A DICOM study: validated, archived and indexed in the instances/series/studies Delta tables.",
)
def dicom_studies(
    context: dg.AssetExecutionContext, config: IngestConfig, lake: LakeResource, archive: ArchiveResource
) -> dg.MaterializeResult:
    study_uid = context.partition_key
    the_lake = lake.lake()
    files = config.files or find_study_files(archive.spool, study_uid)
    context.log.info(f"study {study_uid}: {len(files)} spool file(s)")
    report = ingest_files(
        files,
        archive.targets(the_lake),
        workers=archive.ingest_workers,
        progress=_progress(context, study_uid),
    )
    summary = summarize_study(the_lake, study_uid)
    if summary is None:
        raise dg.Failure(
            description=f"No instance of study {study_uid} is indexed: {report.count('quarantined')} "
            f"file(s) quarantined ({json.dumps(report.reasons)}), {report.count('failed')} unreadable.",
            metadata=_report_metadata(report),
        )
    metadata: dict[str, dg.MetadataValue] = {
        "study_uid": dg.MetadataValue.text(study_uid),
        "patient_id": dg.MetadataValue.text(summary.patient_id or ""),
        "instances": dg.MetadataValue.int(summary.instance_count),
        "series_count": dg.MetadataValue.int(len(summary.series)),
        "modalities": dg.MetadataValue.text(", ".join(summary.modalities)),
        "series": table(summary.series_rows(), SERIES_SCHEMA),
        **_report_metadata(report),
    }
    png = middle_slice_png(preview_series_paths(the_lake, archive.kaapana_home().archive, summary))
    if png:
        metadata["preview"] = dg.MetadataValue.md(png_markdown(png, f"middle slice of {study_uid}"))
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(summary.data_version))


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
    report = ingest_files(config.files, archive.targets(lake.lake()), workers=1)
    for f in report.files:
        if f.status == "quarantined":
            context.log.warning(f"quarantined {f.source}: {f.reason}: {f.error}")
    total = lake.lake().read("quarantine").height
    return dg.MaterializeResult(
        metadata={**_report_metadata(report), "quarantine_total": dg.MetadataValue.int(total)},
        data_version=dg.DataVersion(str(report.versions.get("quarantine"))),
    )


ingest_study_job = dg.define_asset_job(
    "ingest_study", selection=[dicom_studies],
    # One step: in-process saves a second process start (and its imports) per study.
    executor_def=dg.in_process_executor,
    description="Ingest one study from the spool (the incoming_studies sensor requests it while no production "
    "model exists; else ingest_and_segment).",
)
quarantine_job = dg.define_asset_job(
    "quarantine_unreadable", selection=[quarantine], description="Quarantine unreadable spool files."
)

defs = dg.Definitions(assets=[dicom_studies, quarantine], jobs=[ingest_study_job, quarantine_job])
