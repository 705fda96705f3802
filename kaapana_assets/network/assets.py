"""Dagster wiring of DICOM networking: send a study's segmentation results to the
configured node. The work happens in plain modules (sender)."""

import dagster as dg
import polars as pl

from kaapana_assets.ingest.partitions import studies_partitions
from kaapana_assets.lake.schemas import INSTANCES, SEGMENTATIONS
from kaapana_assets.network.sender import record_sent, send_files
from kaapana_assets.segmentation.assets import segmentations
from resources.dicom_node import DicomNodeResource
from resources.storage import ArchiveResource, LakeResource


@dg.asset(
    partitions_def=studies_partitions,
    deps=[segmentations],
    group_name="segmentation",
    kinds={"dicom"},
    description="The study's DICOM SEG results (and optionally the source series) sent to the configured "
    "DICOM node by C-STORE, with retries; every outcome recorded in the `sent` table.",
)
def sent_segmentations(
    context: dg.AssetExecutionContext, lake: LakeResource, archive: ArchiveResource, dicom_node: DicomNodeResource
) -> dg.MaterializeResult:
    study_uid = context.partition_key
    the_lake = lake.lake()
    try:
        node = dicom_node.node()
    except ValueError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    segs = the_lake.read(SEGMENTATIONS, pl.col("study_uid") == study_uid)
    if segs.height == 0:
        raise dg.Failure(description=f"study {study_uid} has no segmentation to send yet", allow_retries=False)
    series = set(segs["seg_series_uid"].to_list())
    if dicom_node.send_source_series:
        series |= set(segs["series_uid"].to_list())
    paths = the_lake.read(INSTANCES, pl.col("series_uid").is_in(sorted(series)))["archive_path"].to_list()
    root = archive.kaapana_home().archive
    outcomes = send_files([root / p for p in paths], node, dicom_node.calling_ae_title, retries=dicom_node.retries)
    version = record_sent(the_lake, outcomes, node)
    failed = [o for o in outcomes if o.status != "success"]
    if failed:
        raise dg.Failure(description=f"{len(failed)} of {len(outcomes)} instance(s) not accepted by {node}: "
                         f"{failed[0].error}", metadata={"sent_delta_version": dg.MetadataValue.int(version or 0)})
    return dg.MaterializeResult(metadata={
        "destination": dg.MetadataValue.text(str(node)),
        "instances_sent": dg.MetadataValue.int(len(outcomes)),
        "attempts": dg.MetadataValue.int(max(o.attempts for o in outcomes)),
        "sent_delta_version": dg.MetadataValue.int(version or 0),
    })


defs = dg.Definitions(assets=[sent_segmentations])
