"""One evaluation end to end: the held-out check (held_out.py), segment and measure
(evaluate.py), summarize and plot (report.py), and record it in MLflow — a run with the
metrics, the plot and the rows, and a tag on the model version naming the cohort version it
was measured on. Plain Python: the segmentation_evaluation asset and the Python client both
call `run_evaluation`."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kaapana_assets.archive.service import Archive
from kaapana_assets.cohorts.membership import CohortSnapshot
from kaapana_assets.evaluation.evaluate import Evaluation, evaluate_cohort
from kaapana_assets.evaluation.held_out import HeldOutCheck, check_held_out
from kaapana_assets.evaluation.report import LOGGED_METRICS, LabelSummary, box_plot_png, evaluation_title, summarize
from kaapana_assets.nnunet.registry import find_version
from kaapana_assets.segmentation.models import LoadedModel
from kaapana_assets.training.tracking import Tracking, code_version

EVALUATION_TAG = "kaapana.evaluated_on."  # + cohort name, on the model version


@dataclass
class EvaluationReport:
    evaluation: Evaluation
    summary: list[LabelSummary]
    plot_png: bytes
    held_out: HeldOutCheck
    mlflow_run_id: str | None = None

    @property
    def title(self) -> str:
        e = self.evaluation
        return evaluation_title(e.model, e.cohort, e.cohort_version, e.cases, len(self.held_out.overlap))


def record_in_mlflow(tracking: Tracking, evaluation: Evaluation, summary: list[LabelSummary], plot_png: bytes,
                     held_out: HeldOutCheck, tags: dict[str, str] | None = None) -> str:
    import mlflow

    e = evaluation
    run_tags = {"kaapana.role": "evaluation", "kaapana.evaluation_id": e.evaluation_id, "kaapana.cohort": e.cohort,
                "kaapana.cohort_version": str(e.cohort_version), "kaapana.model_name": e.model_name,
                "kaapana.model_version": e.model_version, "kaapana.held_out": str(held_out.held_out).lower(),
                **(tags or {})}
    title = evaluation_title(e.model, e.cohort, e.cohort_version, in_sample_patients=len(held_out.overlap))
    with tracking.run(f"evaluate {title}", tags=run_tags) as run:
        mlflow.log_params({"cohort": e.cohort, "cohort_version": e.cohort_version, "model_name": e.model_name,
                           "model_version": e.model_version, "cases": e.cases, "skipped": len(e.skipped),
                           "held_out": held_out.summary[:500], "in_sample_patients": len(held_out.overlap),
                           **{f"delta_version.{k}": v for k, v in e.versions.items()}, **code_version()})
        metrics: dict[str, float] = {}
        for row in summary:
            for key in LOGGED_METRICS:
                value = row[key]
                if value is not None:
                    metrics[f"test_{key}_{row['label']}"] = float(value)
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "boxplot.png").write_bytes(plot_png)
            e.rows.drop("spacing_zyx").write_csv(Path(tmp) / "evaluations.csv")
            mlflow.log_artifacts(tmp, "evaluation")
    dice = ", ".join(f"{r['label']} {r['dice_mean']:.3f}" for r in summary if r["dice_mean"] is not None)
    in_sample = f" (IN-SAMPLE: {len(held_out.overlap)} patient(s) in its training data)" if held_out.overlap else ""
    tracking.client().set_model_version_tag(
        e.model_name, e.model_version, EVALUATION_TAG + e.cohort,
        f"v{e.cohort_version}: evaluation {e.evaluation_id}, {e.cases} cases, mean Dice {dice}{in_sample}")
    return str(run.info.run_id)


def run_evaluation(
    archive: Archive,
    tracking: Tracking,
    snapshot: CohortSnapshot,
    model: LoadedModel,
    progress: Callable[[int, int, str], None] | None = None,
    tags: dict[str, str] | None = None,
    allow_overlap: bool = False,
    held_out: HeldOutCheck | None = None,
) -> EvaluationReport:
    """`held_out`: the check already made (the asset makes it before loading the model); else
    it is made here, from the model version's MLflow tags (NotHeldOut unless `allow_overlap`)."""
    if held_out is None:
        registered = find_version(tracking, model.name, model.version)
        held_out = check_held_out(archive.lake, snapshot, model.ref, dict(registered.tags or {}) if registered else {},
                                  allow_overlap)
    evaluation = evaluate_cohort(archive, snapshot, model, progress)
    summary = summarize(evaluation.rows)
    report = EvaluationReport(evaluation, summary, b"", held_out)
    report.plot_png = box_plot_png(evaluation.rows, report.title)
    report.mlflow_run_id = record_in_mlflow(tracking, evaluation, summary, report.plot_png, held_out, tags)
    return report
