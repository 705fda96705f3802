"""Dagster wiring of training: nnunet_dataset → trained_model (blocking validation check)
→ production_model. The work happens in plain modules (export, nnunet, tracking)."""

import hashlib
import json
from collections.abc import Iterator

import dagster as dg

from kaapana_assets import nnunet
from kaapana_assets.cohorts.assets import cohorts
from kaapana_assets.cohorts.check_records import CohortChecksFailed, require_passed_checks
from kaapana_assets.cohorts.membership import UnknownCohortVersion, read_cohort
from kaapana_assets.cohorts.partitions import cohorts_partitions
from kaapana_assets.metadata_table import columns, table
from kaapana_assets.nnunet.registry import require_version
from kaapana_assets.training.export import ExportError, export_cohort
from kaapana_assets.training.k8s import GPU_POOL
from kaapana_assets.training.run import DatasetRef, train_and_register
from resources.cohorts import CohortDefinitionsResource
from resources.location import GPU_OP_TAGS
from resources.mlflow import MlflowResource
from resources.nnunet import NnunetResource
from resources.storage import ArchiveResource, LakeResource

VALIDATION_CHECK = "validation_dice"
EPOCHS_SCHEMA = columns(
    ("epoch", "int", "1-based"), ("train_loss", "float"), ("val_loss", "float"), ("pseudo_dice", "float"),
)


def _latest_metadata(context: dg.AssetExecutionContext, asset: str) -> dict:
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[context.partition_key]), limit=1
    ).records
    if not records:
        raise dg.Failure(description=f"{asset} has no materialization for {context.partition_key}; materialize it first")
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


@dg.asset(
    partitions_def=cohorts_partitions,
    group_name="training",
    kinds={"nnunet"},
    deps=[cohorts],
    description="The cohort's latest version exported to nnU-Net's raw format, fingerprinted, planned and preprocessed.",
)
def nnunet_dataset(
    context: dg.AssetExecutionContext,
    lake: LakeResource,
    archive: ArchiveResource,
    cohort_definitions: CohortDefinitionsResource,
    nnunet_settings: NnunetResource,
) -> dg.MaterializeResult:
    name = context.partition_key
    definition = cohort_definitions.get(name)
    if definition.purpose != "train":
        raise dg.Failure(description=f"cohort {name} is a {definition.purpose} cohort; nnU-Net datasets are made from train cohorts")
    try:
        snapshot = read_cohort(lake.lake(), name)
    except UnknownCohortVersion as exc:
        raise dg.Failure(description=str(exc.args[0])) from None
    paths = nnunet_settings.paths(name, snapshot.version)
    dataset_id = nnunet.dataset_id_for(name)
    folder = paths.raw / nnunet.dataset_name(dataset_id, name)
    try:
        exported = export_cohort(
            lake.lake(), archive.kaapana_home().archive, snapshot, folder, definition.required_labels,
            progress=lambda done, total: context.log.info(f"exported {done}/{total} cases") if done % 10 == 0 or done == total else None,
        )
    except (ExportError, CohortChecksFailed, nnunet.TooFewPatients) as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    context.log.info("fingerprint, plan and preprocess with nnunetv2")
    fingerprint, plans = nnunet.plan_and_preprocess(paths, dataset_id, processes=nnunet_settings.threads)
    configuration = plans["configurations"][nnunet.CONFIGURATION]
    digest = hashlib.sha256((snapshot.membership_hash + json.dumps(plans, sort_keys=True)).encode()).hexdigest()[:24]
    return dg.MaterializeResult(
        metadata={
            "cohort_version": dg.MetadataValue.int(snapshot.version),
            "membership_hash": dg.MetadataValue.text(snapshot.membership_hash),
            "delta_versions_read": dg.MetadataValue.json(
                {"series": snapshot.series_table_version, "cohort_members": snapshot.cohort_members_version,
                 "instances": snapshot.instances_table_version}
            ),
            "dataset_id": dg.MetadataValue.int(dataset_id),
            "dataset_folder": dg.MetadataValue.path(str(folder)),
            "nnunet_root": dg.MetadataValue.path(str(paths.root)),
            "cases": dg.MetadataValue.int(len(exported.cases)),
            "labels": dg.MetadataValue.json(exported.labels),
            # Voxels two or more reference labels claim, painted by the cohort's label priority
            # (else the smaller structure on top), and per label the voxels it lost to another.
            "overlap_voxels": dg.MetadataValue.int(exported.overlap_voxels),
            "hidden_voxels": dg.MetadataValue.json(exported.hidden_voxels),
            "patch_size": dg.MetadataValue.text(str(configuration["patch_size"])),
            "target_spacing": dg.MetadataValue.text(str(configuration["spacing"])),
            "fingerprint": dg.MetadataValue.json({
                "median_shape": fingerprint.get("shapes_after_crop", [[]])[0] if fingerprint.get("shapes_after_crop") else [],
                "spacings": fingerprint.get("spacings", [])[:20],
                "intensity": fingerprint.get("foreground_intensity_properties_per_channel", {}),
            }),
            "plans": dg.MetadataValue.json(configuration),
        },
        data_version=dg.DataVersion(digest),
    )


@dg.asset(
    partitions_def=cohorts_partitions,
    group_name="training",
    kinds={"nnunet", "pytorch", "mlflow"},
    deps=[nnunet_dataset],
    op_tags=GPU_OP_TAGS,
    pool=GPU_POOL,
    check_specs=[dg.AssetCheckSpec(VALIDATION_CHECK, asset="trained_model", blocking=True,
                                   description="validation Dice of the required labels ≥ the promotion threshold")],
    description="nnU-Net trained on the cohort's dataset, tracked in MLflow and registered as a model version.",
)
def trained_model(
    context: dg.AssetExecutionContext,
    lake: LakeResource,
    cohort_definitions: CohortDefinitionsResource,
    nnunet_settings: NnunetResource,
    mlflow: MlflowResource,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    name = context.partition_key
    dataset = DatasetRef.from_metadata(name, _latest_metadata(context, "nnunet_dataset"))
    try:
        # The checks may have run again (and failed) since the dataset was exported.
        require_passed_checks(lake.lake(), name, dataset.cohort_version)
        outcome = train_and_register(
            dataset, cohort_definitions.get(name).required_labels, nnunet_settings.training_schedule(),
            mlflow.tracking(), nnunet_settings.promotion_dice, nnunet_settings.device, nnunet_settings.threads,
            tags={"dagster.run_id": context.run.run_id, "dagster.partition": name}, log=context.log.info,
        )
    except (CohortChecksFailed, nnunet.TooFewPatients) as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    dice = dg.MetadataValue.json({k: round(v, 4) for k, v in outcome.scores.items()})
    yield dg.MaterializeResult(
        metadata={
            "model_name": dg.MetadataValue.text(outcome.model_name),
            "model_version": dg.MetadataValue.int(outcome.model_version),
            "mlflow_run_id": dg.MetadataValue.text(outcome.run_id),
            "validation_dice": dice,
            "cohort_version": dg.MetadataValue.int(dataset.cohort_version),
            "epochs": table(({**e, "epoch": int(e["epoch"]) + 1} for e in outcome.epochs), EPOCHS_SCHEMA),
        },
        data_version=dg.DataVersion(f"{outcome.model_name}:{outcome.model_version}"),
    )
    yield dg.AssetCheckResult(
        check_name=VALIDATION_CHECK,
        passed=outcome.passed,
        description=f"min Dice over {outcome.required} = {outcome.gate:.3f} (threshold {nnunet_settings.promotion_dice})",
        metadata={"validation_dice": dice, "threshold": dg.MetadataValue.float(nnunet_settings.promotion_dice)},
    )


@dg.asset(
    partitions_def=cohorts_partitions,
    group_name="training",
    kinds={"mlflow"},
    deps=[trained_model],
    description="Moves the MLflow alias `production` to the model version that just passed validation.",
)
def production_model(context: dg.AssetExecutionContext, mlflow: MlflowResource) -> dg.MaterializeResult:
    trained = _latest_metadata(context, "trained_model")
    tracking = mlflow.tracking()
    version = require_version(tracking, trained["model_name"], trained["model_version"])
    if version.tags.get("kaapana.validation") != "passed":
        raise dg.Failure(description=(
            f"{trained['model_name']} v{version.version} failed validation (Dice {version.tags.get('kaapana.validation_dice')}); "
            f"promote it explicitly with `kaapana model promote {trained['model_name']} {version.version}` if intended"))
    tracking.promote(trained["model_name"], version.version)
    return dg.MaterializeResult(
        metadata={"model_name": dg.MetadataValue.text(trained["model_name"]),
                  "model_version": dg.MetadataValue.int(int(version.version)),
                  "alias": dg.MetadataValue.text("production")},
        data_version=dg.DataVersion(f"{trained['model_name']}:{version.version}"),
    )


training_job = dg.define_asset_job(
    "train_cohort",
    selection=dg.AssetSelection.assets(nnunet_dataset, trained_model, production_model),
    description="Export, plan, train, validate, register and (if validation passes) promote.",
)

defs = dg.Definitions(assets=[nnunet_dataset, trained_model, production_model], jobs=[training_job])
