"""Dagster wiring of segmentation: one partition per study, materialized eagerly after
dicom_studies. The work happens in plain modules (models, segment)."""

import json

import dagster as dg
from pydantic import Field

from kaapana_assets.ingest.assets import STUDIES_PER_RUN, dicom_studies
from kaapana_assets.ingest.partitions import studies_partitions
from kaapana_assets.ingest.study import combined_version, png_markdown
from kaapana_assets.metadata_table import columns, links_markdown, table
from kaapana_assets.nnunet.registry import ModelVersionNotFound
from kaapana_assets.segmentation.models import pinned_model, production_model
from kaapana_assets.segmentation.segment import SegmentationResult, segment_studies
from kaapana_assets.training.k8s import GPU_POOL
from resources.location import GPU_OP_TAGS
from resources.mlflow import MlflowResource
from resources.nnunet import NnunetResource
from resources.storage import ArchiveResource, LakeResource
from resources.viewer import ViewerResource

# The label_statistics rows, less the bounding box (in the Delta table).
STATISTICS_SCHEMA = columns(
    ("label", "string"), ("voxel_count", "int"), ("volume_ml", "float"),
    ("mean_hu", "float"), ("min_hu", "float"), ("max_hu", "float"),
)


class SegmentationConfig(dg.Config):
    model_version: str = Field(
        default="",
        description="Registry version of the segmentation model to use; empty: the one holding `production` "
        "when the run starts. The incoming sensor pins the production version it saw when it requested the run.",
    )


BURST_SCHEMA = columns(
    ("study_uid", "string"), ("source_series_uid", "string"), ("seg_series_uid", "string"),
    ("volumes_ml", "string", "per label"), ("reused", "bool"),
)


@dg.asset(
    partitions_def=studies_partitions,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=STUDIES_PER_RUN),
    deps=[dicom_studies],
    group_name="segmentation",
    kinds={"nnunet", "dicom", "deltalake"},
    op_tags=GPU_OP_TAGS,
    pool=GPU_POOL,
    automation_condition=dg.AutomationCondition.eager(),
    description="nnU-Net segmentation of the study's CT with the production model, written back as a DICOM SEG "
    "(archived and indexed) with per-label statistics.",
)
def segmentations(
    context: dg.AssetExecutionContext,
    config: SegmentationConfig,
    lake: LakeResource,
    archive: ArchiveResource,
    nnunet_settings: NnunetResource,
    mlflow: MlflowResource,
    viewer: ViewerResource,
) -> dg.MaterializeResult:
    the_lake = lake.lake()
    study_uids = list(context.partition_keys)
    try:
        # Loaded once for every study of the run (and cached in the process).
        tracking, name = mlflow.tracking(), nnunet_settings.segmentation_model_name()
        cache, device = nnunet_settings.model_cache(), nnunet_settings.device
        if config.model_version:
            model = pinned_model(tracking, name, config.model_version, cache, device)
        else:
            model = production_model(tracking, name, cache, device)
    except ModelVersionNotFound as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    site_archive = archive.open(the_lake)
    def progress(done: int, total: int, result: SegmentationResult) -> None:
        context.log.info(f"{result.study_uid}: {'reused' if result.reused else 'segmented'} with {result.model} "
                         f"({done}/{total})")

    # One commit of the index and the statistics for all of the run's studies.
    results, skipped = segment_studies(site_archive, study_uids, model, progress)
    if skipped:
        # The others' SEGs are committed: a rerun reuses them and fails only for these.
        # A reason, not a traceback; retrying would not change it.
        raise dg.Failure(description="; ".join(skipped.values()), allow_retries=False,
                         metadata={"segmented": dg.MetadataValue.json([r.study_uid for r in results])})
    if len(results) > 1:
        return dg.MaterializeResult(
            metadata={
                "model": dg.MetadataValue.text(results[0].model),
                "studies": table([{"study_uid": r.study_uid, "source_series_uid": r.series_uid,
                                   "seg_series_uid": r.seg_series_uid, "reused": r.reused,
                                   "volumes_ml": json.dumps({s["label"]: s["volume_ml"] for s in r.statistics})}
                                  for r in results], BURST_SCHEMA),
                "study_count": dg.MetadataValue.int(len(results)),
                "viewer": links_markdown([(r.study_uid, viewer.segmentation(r.study_uid, r.series_uid, r.seg_series_uid))
                                          for r in results]),
                "delta_versions": dg.MetadataValue.json(results[-1].versions),
            },
            data_version=dg.DataVersion(combined_version([f"{r.model}:{r.seg_sop_uid[-12:]}" for r in results])),
        )
    result = results[0]
    study_uid = result.study_uid
    metadata: dict[str, dg.MetadataValue] = {
        "model": dg.MetadataValue.text(result.model),
        "viewer": viewer.segmentation(study_uid, result.series_uid, result.seg_series_uid),
        "source_series_uid": dg.MetadataValue.text(result.series_uid),
        "seg_series_uid": dg.MetadataValue.text(result.seg_series_uid),
        "seg_sop_instance_uid": dg.MetadataValue.text(result.seg_sop_uid),
        "statistics": table(result.statistics, STATISTICS_SCHEMA),
        "volumes_ml": dg.MetadataValue.json({s["label"]: s["volume_ml"] for s in result.statistics}),
        "reused_existing": dg.MetadataValue.bool(result.reused),
        "delta_versions": dg.MetadataValue.json(result.versions),
    }
    if result.preview_png:
        metadata["overlay"] = dg.MetadataValue.md(png_markdown(result.preview_png, f"segmentation of {study_uid}"))
    # The model version is part of the data version: a new production model makes a new one.
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(f"{result.model}:{result.seg_sop_uid[-12:]}"))


# The automatic path: the incoming_studies sensor requests this job once a production model
# exists, so a study (or a burst of them, as a partition range) is ingested and segmented in
# one run — one process start, one model load — instead of an ingest run, an automation tick
# and a segmentation run. In-process executor:
# the steps share the run's process (the multiprocess executor would start and import one per
# step); the `gpu` pool still holds the segmentations step to one at a time across runs. On
# Kubernetes the run is one pod: the run-level `dagster-k8s/config` tag puts that pod on a GPU
# node (the steps' own op tags only shape step pods of the k8s_job_executor).
ingest_and_segment_job = dg.define_asset_job(
    "ingest_and_segment", selection=[dicom_studies, segmentations],
    executor_def=dg.in_process_executor,
    tags=GPU_OP_TAGS,
    description="Ingest a study, or a burst of studies (a partition range), from the spool and segment it with the "
    "production model, in one run (the incoming_studies sensor requests it while a production model exists).",
)

segment_job = dg.define_asset_job(
    "segment_studies", selection=[segmentations],
    # One step: in-process saves the step's own process start (imports of torch, nnU-Net and
    # dagster again); on Kubernetes the run pod is then the one that needs the GPU.
    executor_def=dg.in_process_executor,
    tags=GPU_OP_TAGS,
    description="Segment studies with the production model (the model_promotion sensor requests it).",
)

defs = dg.Definitions(assets=[segmentations], jobs=[segment_job, ingest_and_segment_job])
