"""`model_promotion`: when the `production` alias of the segmentation model moves, request
re-segmentation — of every study, or only of a cohort's studies."""


import dagster as dg
import polars as pl

from kaapana_assets.cohorts.membership import UnknownCohortVersion, read_cohort
from kaapana_assets.lake.schemas import SERIES
from kaapana_assets.nnunet.registry import find_version
from kaapana_assets.segmentation.assets import segment_job
from resources.mlflow import MlflowResource
from resources.nnunet import NnunetResource
from resources.storage import LakeResource


@dg.sensor(
    job=segment_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Re-segments studies when the production model changes (KAAPANA_RESEGMENT_COHORT limits it to a cohort).",
)
def model_promotion(
    context: dg.SensorEvaluationContext, lake: LakeResource, nnunet_settings: NnunetResource, mlflow: MlflowResource
) -> dg.SensorResult:
    name = nnunet_settings.segmentation_model_name()
    version = find_version(mlflow.tracking(), name)
    if version is None:
        return dg.SensorResult(skip_reason=f"no production version of {name}")
    current = f"{name}:{version.version}"
    if context.cursor == current:
        return dg.SensorResult(skip_reason=f"production is still {current}")
    if context.cursor is None:
        # First sight of a model: the automation already segments new studies with it.
        return dg.SensorResult(cursor=current, skip_reason=f"now watching {current}")
    cohort = nnunet_settings.resegment_cohort
    if cohort:
        try:
            studies = sorted(set(read_cohort(lake.lake(), cohort).members["study_uid"].to_list()))
        except UnknownCohortVersion as exc:
            return dg.SensorResult(skip_reason=str(exc.args[0]))
    else:
        studies = sorted(set(lake.lake().read(SERIES).filter(pl.col("modality") == "CT")["study_uid"].to_list()))
    known = set(context.instance.get_dynamic_partitions("studies"))
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=s, run_key=f"{current}:{s}") for s in studies if s in known],
        cursor=current,
    )
