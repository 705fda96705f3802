"""Dagster wiring of evaluation: segmentation_evaluation[cohort] (a model version measured on a
cohort version against its reference SEGs), its blocking check evaluation_gate, and
evaluated_promotion[cohort] (moves `production` to the evaluated version, only after the gate
passed). The work happens in plain modules (models, evaluate, report, run)."""

from typing import Any

import dagster as dg
from pydantic import Field

from kaapana_assets.cohorts.assets import cohorts
from kaapana_assets.cohorts.definitions import CohortDefinitionError
from kaapana_assets.cohorts.membership import UnknownCohortVersion, read_cohort
from kaapana_assets.cohorts.partitions import cohorts_partitions
from kaapana_assets.evaluation.evaluate import EvaluationError, read_evaluation
from kaapana_assets.evaluation.held_out import NotHeldOut, check_held_out
from kaapana_assets.evaluation.models import resolve_version
from kaapana_assets.evaluation.report import CaseResult, GateOutcome, case_results, gate, summarize
from kaapana_assets.evaluation.run import run_evaluation
from kaapana_assets.ingest.study import png_markdown
from kaapana_assets.lake import Lake
from kaapana_assets.metadata_table import columns, table
from kaapana_assets.nnunet.registry import PRODUCTION, ModelVersionNotFound, find_version
from kaapana_assets.segmentation.models import loaded_version
from kaapana_assets.segmentation.segment import NothingToSegment
from kaapana_assets.training.k8s import GPU_POOL
from resources.cohorts import CohortDefinitionsResource
from resources.location import GPU_OP_TAGS
from resources.mlflow import MlflowResource
from resources.nnunet import NnunetResource
from resources.storage import ArchiveResource, LakeResource
from resources.viewer import ViewerResource

GATE_CHECK = "evaluation_gate"
SUMMARY_SCHEMA = columns(
    ("label", "string"), ("cases", "int"), ("dice_mean", "float"), ("dice_median", "float"), ("dice_std", "float"),
    ("dice_min", "float"), ("hd95_median_mm", "float"), ("hd95_mean_mm", "float"), ("assd_mean_mm", "float"),
    ("volume_difference_mean_ml", "float", "predicted − reference"), ("volume_difference_mean_abs_ml", "float"),
)
SKIPPED_SCHEMA = columns(("series_uid", "string"), ("reason", "string"))


def cases_markdown(cases: list[CaseResult], labels: list[str], viewer: ViewerResource) -> dg.MarkdownMetadataValue:
    """The per-case table, each case linked into the viewer: its study with the model's SEG, and
    with each reference SEG. Markdown, not a Dagster table: the UI makes links clickable only there."""
    def dice(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = ["| patient | study | " + " | ".join(f"Dice {label}" for label in labels) + " | predicted | reference |",
             "|" + " --- |" * (len(labels) + 4)]
    for case in cases:
        predicted = f"[open]({viewer.segmentation(case.study_uid, case.series_uid, case.predicted_seg_series_uid).url})"
        references = ", ".join(f"[open]({viewer.segmentation(case.study_uid, case.series_uid, uid).url})"
                               for uid in case.reference_seg_series_uids) or "–"
        patient = case.patient_id.replace("|", "\\|")  # a DICOM value: it must not end the cell
        lines.append(f"| {patient} | …{case.study_uid[-12:]} | "
                     + " | ".join(dice(case.dice.get(label)) for label in labels) + f" | {predicted} | {references} |")
    return dg.MetadataValue.md("\n".join(lines))


class EvaluationConfig(dg.Config):
    """Which model version, which cohort version, and the promotion gate's thresholds."""

    model_name: str = Field(default="", description="registered model to evaluate; empty: the site's segmentation "
                            "model (KAAPANA_SEGMENTATION_MODEL, default nnunet-liver-train)")
    model_version: str = Field(default="", description="its version number; empty: the version holding the alias "
                               "`production`")
    cohort_version: int = Field(default=0, description="the cohort version to measure on; 0: the latest")
    min_dice: float = Field(default=0.0, ge=0.0, le=1.0, description="evaluation_gate (blocking): the lowest mean "
                            "Dice of each required label; 0 (the default) leaves the gate open")
    max_hd95_mm: float = Field(default=0.0, ge=0.0, description="evaluation_gate: the largest median HD95 (mm) of "
                               "each required label; 0 (the default): not gated")
    allow_overlap: bool = Field(default=False, description="evaluate even when patients of the cohort version are in "
                                "the model's training data (a deliberate in-sample report, titled so, never "
                                "promoted); off: such an evaluation fails, naming them")


def _latest(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, partition: str) -> dict[str, Any]:
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("segmentation_evaluation"), asset_partitions=[partition]), limit=1
    ).records
    if not records:
        raise dg.Failure(description=f"segmentation_evaluation has no materialization for {partition}; "
                         "materialize it first")
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def _required_labels(cohort_definitions: CohortDefinitionsResource, name: str) -> list[str]:
    try:
        return list(cohort_definitions.get(name).required_labels)
    except CohortDefinitionError:
        return []  # the definition may be gone; the gate then covers every evaluated label


@dg.asset(
    partitions_def=cohorts_partitions,
    group_name="evaluation",
    kinds={"nnunet", "deltalake", "mlflow"},
    deps=[cohorts],
    op_tags=GPU_OP_TAGS,
    pool=GPU_POOL,
    description="A model version (default: production) measured on a cohort version against its reference SEGs: "
    "Dice, HD95, ASSD (mm, voxel spacing honoured) and volume difference per case and label, in the Delta table "
    "`evaluations`, with a summary and a box plot per label.",
)
def segmentation_evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    lake: LakeResource,
    archive: ArchiveResource,
    nnunet_settings: NnunetResource,
    mlflow: MlflowResource,
    viewer: ViewerResource,
) -> dg.MaterializeResult:
    name = context.partition_key
    the_lake, tracking = lake.lake(), mlflow.tracking()
    model_name = config.model_name or nnunet_settings.segmentation_model_name()
    try:
        snapshot = read_cohort(the_lake, name, config.cohort_version or None)
        version = resolve_version(tracking, model_name, config.model_version or None)
        # Before the model is fetched: patients it learned from are not a test of it.
        held_out = check_held_out(the_lake, snapshot, f"{model_name}:v{version.version}", dict(version.tags or {}),
                                  config.allow_overlap)
        (context.log.info if held_out.held_out else context.log.warning)(held_out.summary)
        model = loaded_version(tracking, version, model_name, nnunet_settings.model_cache(), nnunet_settings.device)
        report = run_evaluation(
            archive.open(the_lake), tracking, snapshot, model,
            progress=lambda done, total, uid: context.log.info(f"evaluated {done}/{total}: {uid}"),
            tags={"dagster.run_id": context.run.run_id, "dagster.partition": name}, held_out=held_out,
        )
    except (UnknownCohortVersion, ModelVersionNotFound) as exc:
        raise dg.Failure(description=str(exc.args[0]), allow_retries=False) from None
    except (EvaluationError, NothingToSegment, NotHeldOut) as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    e = report.evaluation
    for skipped in e.skipped:
        context.log.warning(f"not evaluated: {skipped['series_uid']}: {skipped['reason']}")
    metadata: dict[str, Any] = {
        "evaluation_id": dg.MetadataValue.text(e.evaluation_id),
        "model_name": dg.MetadataValue.text(e.model_name),
        "model_version": dg.MetadataValue.text(e.model_version),
        "cohort_version": dg.MetadataValue.int(e.cohort_version),
        "cases": dg.MetadataValue.int(e.cases),
        "labels": dg.MetadataValue.json(e.labels),
        "summary": table(report.summary, SUMMARY_SCHEMA),
        "cases_in_viewer": cases_markdown(case_results(e.rows), list(e.labels), viewer),
        "boxplot": dg.MetadataValue.md(png_markdown(report.plot_png, report.title)),
        "held_out": dg.MetadataValue.bool(held_out.held_out),
        "training_data": dg.MetadataValue.text(held_out.summary),
        "in_sample_patients": dg.MetadataValue.json(list(held_out.overlap)),
        "dice_mean": dg.MetadataValue.json({r["label"]: r["dice_mean"] for r in report.summary}),
        "skipped": table(e.skipped, SKIPPED_SCHEMA),
        "delta_versions": dg.MetadataValue.json(e.versions),
        "mlflow_run_id": dg.MetadataValue.text(report.mlflow_run_id or ""),
        # What evaluation_gate and evaluated_promotion read back.
        "gate_min_dice": dg.MetadataValue.float(config.min_dice),
        "gate_max_hd95_mm": dg.MetadataValue.float(config.max_hd95_mm),
    }
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(
        f"{e.evaluation_id}:{e.versions.get('evaluations')}"))


def _gate_outcome(the_lake: Lake, evaluation: dict[str, Any], required: list[str]) -> GateOutcome:
    rows = read_evaluation(the_lake, str(evaluation["evaluation_id"]))
    labels = [label for label in required if label in set(rows["label"].to_list())] or required
    return gate(summarize(rows), labels, float(evaluation.get("gate_min_dice", 0.0)),
                float(evaluation.get("gate_max_hd95_mm", 0.0)))


@dg.asset_check(
    asset=segmentation_evaluation,
    name=GATE_CHECK,
    blocking=True,
    partitions_def=cohorts_partitions,
    description="Mean Dice of each required label ≥ min_dice (and median HD95 ≤ max_hd95_mm when set), as configured "
    "on segmentation_evaluation; open by default (min_dice 0). Blocking: evaluated_promotion does not run after a "
    "failed gate.",
)
def evaluation_gate(
    context: dg.AssetCheckExecutionContext, lake: LakeResource, cohort_definitions: CohortDefinitionsResource
) -> dg.AssetCheckResult:
    evaluation = _latest(context, context.partition_key)
    outcome = _gate_outcome(lake.lake(), evaluation, _required_labels(cohort_definitions, context.partition_key))
    return dg.AssetCheckResult(
        passed=outcome.passed, description=outcome.description, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"evaluation_id": dg.MetadataValue.text(str(evaluation["evaluation_id"])),
                  "model": dg.MetadataValue.text(f"{evaluation['model_name']}:v{evaluation['model_version']}"),
                  "min_dice": dg.MetadataValue.float(float(evaluation.get("gate_min_dice", 0.0))),
                  "max_hd95_mm": dg.MetadataValue.float(float(evaluation.get("gate_max_hd95_mm", 0.0))),
                  **{k: dg.MetadataValue.float(v) for k, v in outcome.values.items() if v is not None}},
    )


@dg.asset(
    partitions_def=cohorts_partitions,
    group_name="evaluation",
    kinds={"mlflow"},
    deps=[segmentation_evaluation],
    description="Moves the MLflow alias `production` to the model version segmentation_evaluation measured, once "
    "the blocking evaluation_gate passed (the evaluate_and_promote job).",
)
def evaluated_promotion(
    context: dg.AssetExecutionContext, lake: LakeResource, cohort_definitions: CohortDefinitionsResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    evaluation = _latest(context, context.partition_key)
    # The blocking check stops this asset within a run; a run of this asset alone is held to the same gate.
    outcome = _gate_outcome(lake.lake(), evaluation, _required_labels(cohort_definitions, context.partition_key))
    name, version = str(evaluation["model_name"]), str(evaluation["model_version"])
    if evaluation.get("held_out") is False:
        raise dg.Failure(description=f"{name} v{version} was evaluated in-sample ({evaluation.get('training_data')}); "
                         "an evaluation on patients it trained on never promotes it", allow_retries=False)
    if not outcome.passed:
        raise dg.Failure(description=f"{name} v{version} did not pass the evaluation gate: {outcome.description}",
                         allow_retries=False)
    tracking = mlflow.tracking()
    before = find_version(tracking, name)
    tracking.promote(name, version)
    context.log.info(f"{name}: {PRODUCTION} v{before.version if before else '—'} → v{version}")
    return dg.MaterializeResult(
        metadata={"model_name": dg.MetadataValue.text(name), "model_version": dg.MetadataValue.text(version),
                  "previous_version": dg.MetadataValue.text(str(before.version) if before else ""),
                  "evaluation_id": dg.MetadataValue.text(str(evaluation["evaluation_id"])),
                  "gate": dg.MetadataValue.text(outcome.description)},
        data_version=dg.DataVersion(f"{name}:{version}"),
    )


evaluate_job = dg.define_asset_job(
    "evaluate_model", selection=dg.AssetSelection.assets(segmentation_evaluation),
    description="Evaluate a model version on a test cohort against its reference SEGs (with the gate check).",
)
evaluate_and_promote_job = dg.define_asset_job(
    "evaluate_and_promote", selection=dg.AssetSelection.assets(segmentation_evaluation, evaluated_promotion),
    description="Evaluate a model version, and promote it to production if the blocking evaluation_gate passes.",
)

defs = dg.Definitions(
    assets=[segmentation_evaluation, evaluated_promotion],
    asset_checks=[evaluation_gate],
    jobs=[evaluate_job, evaluate_and_promote_job],
)
