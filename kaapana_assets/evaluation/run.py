"""One evaluation end to end: segment and measure (evaluate.py), summarize and plot
(report.py), and record it in MLflow — a run with the metrics, the plot and the rows, and a
tag on the model version naming the cohort version it was measured on. Plain Python: the
segmentation_evaluation asset and the Python client both call `run_evaluation`."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaapana_assets.cohorts.membership import CohortSnapshot
from kaapana_assets.evaluation.evaluate import Evaluation, evaluate_cohort
from kaapana_assets.evaluation.report import box_plot_png, summarize
from kaapana_assets.ingest.pipeline import IngestTargets
from kaapana_assets.lake import Lake
from kaapana_assets.segmentation.models import LoadedModel
from kaapana_assets.training.tracking import Tracking, code_version

EVALUATION_TAG = "kaapana.evaluated_on."  # + cohort name, on the model version


@dataclass
class EvaluationReport:
    evaluation: Evaluation
    summary: list[dict[str, Any]]
    plot_png: bytes
    mlflow_run_id: str | None = None


def record_in_mlflow(tracking: Tracking, evaluation: Evaluation, summary: list[dict[str, Any]], plot_png: bytes,
                     tags: dict[str, str] | None = None) -> str:
    import mlflow

    e = evaluation
    run_tags = {"kaapana.role": "evaluation", "kaapana.evaluation_id": e.evaluation_id, "kaapana.cohort": e.cohort,
                "kaapana.cohort_version": str(e.cohort_version), "kaapana.model_name": e.model_name,
                "kaapana.model_version": e.model_version, **(tags or {})}
    with tracking.run(f"evaluate {e.model} on {e.cohort} v{e.cohort_version}", tags=run_tags) as run:
        mlflow.log_params({"cohort": e.cohort, "cohort_version": e.cohort_version, "model_name": e.model_name,
                           "model_version": e.model_version, "cases": e.cases, "skipped": len(e.skipped),
                           **{f"delta_version.{k}": v for k, v in e.versions.items()}, **code_version()})
        metrics: dict[str, float] = {}
        for row in summary:
            for key in ("dice_mean", "hd95_median_mm", "assd_mean_mm", "volume_difference_mean_ml"):
                if row[key] is not None:
                    metrics[f"test_{key}_{row['label']}"] = float(row[key])
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "boxplot.png").write_bytes(plot_png)
            e.rows.drop("spacing_zyx").write_csv(Path(tmp) / "evaluations.csv")
            mlflow.log_artifacts(tmp, "evaluation")
    dice = ", ".join(f"{r['label']} {r['dice_mean']:.3f}" for r in summary if r["dice_mean"] is not None)
    tracking.client().set_model_version_tag(
        e.model_name, e.model_version, EVALUATION_TAG + e.cohort,
        f"v{e.cohort_version}: evaluation {e.evaluation_id}, {e.cases} cases, mean Dice {dice}")
    return str(run.info.run_id)


def run_evaluation(
    lake: Lake,
    targets: IngestTargets,
    tracking: Tracking,
    snapshot: CohortSnapshot,
    model: LoadedModel,
    progress: Callable[[int, int, str], None] | None = None,
    tags: dict[str, str] | None = None,
) -> EvaluationReport:
    evaluation = evaluate_cohort(lake, targets, snapshot, model, progress)
    summary = summarize(evaluation.rows)
    plot = box_plot_png(evaluation.rows, f"{evaluation.model} on {evaluation.cohort} v{evaluation.cohort_version} "
                                         f"({evaluation.cases} cases)")
    run_id = record_in_mlflow(tracking, evaluation, summary, plot, tags)
    return EvaluationReport(evaluation, summary, plot, run_id)
