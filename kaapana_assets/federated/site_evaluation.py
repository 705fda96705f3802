"""A model evaluated at a site on the site's own held-out cohort, and what of it may leave.

At the site (`evaluate_at_site`): the held-out check first (evaluation/held_out.py, #33's
rules: no patient of the evaluated cohort version among the patients this site gave the
model), then the cohort exported locally, every case predicted and measured with the code
`segmentation_evaluation` uses (evaluation/metrics.py, evaluate.metric_row: Dice, HD95,
ASSD, volumes), the per-case rows kept in the site's work folder, and only their
aggregates sent: per label and metric the number of cases, mean, median, quartiles,
whiskers, minimum and maximum (a box plot's worth, `bxp_stats`).

Small cells: a label and metric measured on fewer cases than the threshold (5, as in the
network statistics; a site may raise it for itself) leaves as `cases: null`, `reported:
"<5"` and no values. At the hub, `parse_evaluation` refuses an answer that breaks this.

Which training data a model has at this site (what the held-out check holds the cohort to):
- the federated model of round r: this site's cohort versions in rounds 1..r of the experiment;
- this site's own local baseline (cross-site evaluation): the cohort version it was trained on;
- another site's local baseline: nothing here (it learned from that site's patients only).

Plain module: no Dagster, no Flower."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaapana_assets.federation.guard import DEFAULT_THRESHOLD, MAX_THRESHOLD, small_cell_marker
from kaapana_assets.federation.store import checked_name

if TYPE_CHECKING:
    import torch

    from kaapana_assets.cohorts.membership import CohortSnapshot
    from kaapana_assets.evaluation.held_out import HeldOutCheck
    from kaapana_assets.federated.site import SiteContext

FORMAT_VERSION = 1
GLOBAL = "global"  # the model owner of the federation's own (global) model


class Metric(StrEnum):
    """What is summarised per label: the columns of segmentation_evaluation's rows."""

    DICE = "dice"
    HD95 = "hd95_mm"
    ASSD = "assd_mm"
    REFERENCE_ML = "reference_ml"
    PREDICTED_ML = "predicted_ml"
    VOLUME_DIFFERENCE_ML = "volume_difference_ml"


STATISTICS = ("mean", "median", "q1", "q3", "whislo", "whishi", "minimum", "maximum")


class EvaluationRefused(ValueError):
    """A site's answer that breaks the format or the small-cell rule (the hub does not use it)."""


@dataclass(frozen=True)
class MetricSummary:
    """One label's metric over a site's cases; every value None when suppressed."""

    label: str
    metric: Metric
    cases: int | None
    reported: str  # the case count as published: "12", or "<5" when suppressed
    mean: float | None = None
    median: float | None = None
    q1: float | None = None
    q3: float | None = None
    whislo: float | None = None  # Tukey's whiskers: the furthest values within 1.5 IQR of the box
    whishi: float | None = None
    minimum: float | None = None
    maximum: float | None = None

    @property
    def suppressed(self) -> bool:
        return self.cases is None

    def bxp_stats(self) -> dict[str, Any]:
        """matplotlib's `Axes.bxp` input (no fliers: the cases beyond the whiskers stay at the site)."""
        if self.suppressed:
            raise ValueError(f"{self.label} {self.metric} is suppressed: no box to draw")
        return {"label": self.label, "med": self.median, "q1": self.q1, "q3": self.q3, "whislo": self.whislo,
                "whishi": self.whishi, "mean": self.mean, "fliers": []}

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "metric": str(self.metric)}


def summarize(values: Sequence[float], label: str, metric: Metric, threshold: int) -> MetricSummary:
    """The aggregates of one label's metric over the cases it is defined for."""
    if len(values) < threshold:
        return MetricSummary(label, metric, None, small_cell_marker(threshold))
    import numpy as np

    data = np.sort(np.asarray(values, dtype=np.float64))
    q1, median, q3 = (float(v) for v in np.percentile(data, [25, 50, 75]))
    iqr = q3 - q1
    within = data[(data >= q1 - 1.5 * iqr) & (data <= q3 + 1.5 * iqr)]
    return MetricSummary(label, metric, int(data.size), str(int(data.size)), float(data.mean()), median, q1, q3,
                         float(within.min()), float(within.max()), float(data[0]), float(data[-1]))


def summarize_rows(rows: Iterable[Mapping[str, Any]], labels: Sequence[str], threshold: int) -> list[MetricSummary]:
    """Per label and metric, over segmentation_evaluation-style per-case rows (`label` and one
    column per Metric; None where a metric is undefined for the case)."""
    rows = list(rows)
    return [summarize([float(r[str(m)]) for r in rows if r["label"] == label and r[str(m)] is not None],
                      label, m, threshold) for label in labels for m in Metric]


@dataclass(frozen=True)
class ModelEvaluation:
    """What leaves a site about one model: aggregates over its held-out cohort."""

    site: str
    model: str  # the model's owner: GLOBAL, or the site whose local baseline it is
    cohort: str
    cohort_version: int
    threshold: int
    held_out: str  # the held-out check's one-line summary (counts and names of cohorts, no patient)
    summaries: tuple[MetricSummary, ...]

    def to_json(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "site": self.site, "model": self.model, "cohort": self.cohort,
                "cohort_version": self.cohort_version, "threshold": self.threshold, "held_out": self.held_out,
                "summaries": [s.to_json() for s in self.summaries]}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    def summary(self, label: str, metric: Metric) -> MetricSummary | None:
        return next((s for s in self.summaries if s.label == label and s.metric == metric), None)


def _number(value: object, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise EvaluationRefused(f"{field} is not a finite number")
    return float(value)


def parse_evaluation(data: str, site: str, model: str, threshold: int) -> ModelEvaluation:
    """A site's answer, checked: EvaluationRefused unless it is well-formed, from `site`, about
    `model`, and every summary is either over at least `threshold` cases or fully suppressed."""
    try:
        answer = json.loads(data)
    except ValueError as exc:
        raise EvaluationRefused(f"not JSON: {exc}") from None
    if not isinstance(answer, dict) or answer.get("version") != FORMAT_VERSION:
        raise EvaluationRefused(f"not a version {FORMAT_VERSION} evaluation")
    if answer.get("site") != site or answer.get("model") != model:
        raise EvaluationRefused(f"answer is about model {str(answer.get('model'))[:40]!r} at "
                                f"{str(answer.get('site'))[:40]!r}, expected {model!r} at {site!r}")
    applied = answer.get("threshold")
    if not isinstance(applied, int) or isinstance(applied, bool) or not threshold <= applied <= MAX_THRESHOLD:
        raise EvaluationRefused(f"suppressed with threshold {applied!r}, the hub asked for at least {threshold}")
    summaries = []
    for raw in answer.get("summaries") or []:
        try:
            metric = Metric(raw["metric"])
            values = {k: _number(raw.get(k), k) for k in STATISTICS}
            cases = raw.get("cases")
            summary = MetricSummary(str(raw["label"]), metric, cases, str(raw["reported"]), **values)
        except (KeyError, TypeError, ValueError) as exc:
            raise EvaluationRefused(f"malformed summary: {exc}") from None
        if cases is None:
            if any(v is not None for v in values.values()) or summary.reported != small_cell_marker(applied):
                raise EvaluationRefused(f"{summary.label} {metric}: a suppressed cell carries values")
        elif isinstance(cases, bool) or not isinstance(cases, int) or cases < applied or summary.reported != str(cases):
            raise EvaluationRefused(f"{summary.label} {metric}: {cases!r} cases in the clear, below {applied}")
        summaries.append(summary)
    return ModelEvaluation(site, model, str(answer.get("cohort")), int(answer.get("cohort_version") or 0), applied,
                           str(answer.get("held_out", "")), tuple(summaries))


# -- at the site -----------------------------------------------------------------------------------

def training_tags(ctx: SiteContext, experiment: str, model: str, round_: int) -> dict[str, str]:
    """The training lineage of `model` at this site, as evaluation/held_out.py reads it."""
    if model == GLOBAL:
        return {"kaapana.source": "federated", "kaapana.federated_experiment": experiment,
                "kaapana.rounds": str(round_)}
    if model == ctx.site:
        exported = json.loads((ctx.paths(experiment).root / "cohort.json").read_text())
        return {"kaapana.cohort": str(exported["cohort"]), "kaapana.cohort_version": str(exported["version"])}
    return {}  # another site's local baseline learned nothing from this site's patients


def check_model(ctx: SiteContext, experiment: str, snapshot: CohortSnapshot, model: str, round_: int) -> HeldOutCheck:
    """The held-out check of `model` on this site's cohort version; NotHeldOut when it is not,
    saying how many patients overlap but not which (the message goes to the hub)."""
    from kaapana_assets.evaluation.held_out import NotHeldOut, check_held_out

    name = f"{experiment}:{model}" + (f"@round{round_}" if model == GLOBAL else "")
    check = check_held_out(ctx.lake, snapshot, name, training_tags(ctx, experiment, model, round_), allow_overlap=True)
    if not check.held_out:
        raise NotHeldOut(f"{ctx.site} refuses to evaluate {name} on {snapshot.cohort} v{snapshot.version}: "
                         f"{check.summary}")
    return check


def export_held_out(ctx: SiteContext, experiment: str, snapshot: CohortSnapshot, labels: list[str]) -> Path:
    """The cohort version in nnU-Net's raw layout under the experiment's work folder (kept
    per version: every model of one request, and a later request, reads the same export)."""
    from kaapana_assets.training.export import export_cohort

    target = ctx.paths(experiment).root / "held-out" / checked_name("cohort", snapshot.cohort) / f"v{snapshot.version}"
    if (target / "cases.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    export_cohort(ctx.lake, ctx.archive_root, snapshot, staging / "dataset", labels)
    (staging / "dataset").rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def case_rows(predictor: object, raw: Path, labels: Mapping[str, int]) -> list[dict[str, Any]]:
    """Every exported case predicted and measured: segmentation_evaluation's metric rows, with
    the export's case name (site-local, never sent)."""
    import SimpleITK as sitk

    from kaapana_assets.evaluation.evaluate import metric_row
    from kaapana_assets.evaluation.metrics import case_metrics
    from kaapana_assets.nnunet.prediction import predict

    rows = []
    for case in json.loads((raw / "cases.json").read_text()):
        name = case["case"]
        image = sitk.ReadImage(str(raw / "imagesTr" / f"{name}_0000.nii.gz"))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{name}.nii.gz")))
        spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
        predicted = predict(predictor, sitk.GetArrayFromImage(image), spacing)  # type: ignore[arg-type]
        for label, metrics in case_metrics(truth, predicted, spacing, labels).items():  # type: ignore[arg-type]
            rows.append({"case": name, **metric_row(label, labels[label], metrics)})
    return rows


def evaluate_at_site(ctx: SiteContext, experiment: str, cohort: str, model: str, round_: int,
                     weights: Mapping[str, torch.Tensor], threshold: int = DEFAULT_THRESHOLD) -> ModelEvaluation:
    """`weights` (the experiment's network) on this site's latest version of `cohort`: held-out
    check, export, per-case metrics kept here, aggregates returned (the caller guards and sends)."""
    from kaapana_assets import nnunet
    from kaapana_assets.cohorts.membership import read_cohort

    snapshot = read_cohort(ctx.lake, cohort)
    check = check_model(ctx, experiment, snapshot, model, round_)  # before anything is computed
    spec = ctx.store.read_json(experiment, "experiment")
    raw = export_held_out(ctx, experiment, snapshot, list(spec["labels"]))
    dataset_json = json.loads((raw / "dataset.json").read_text())
    labels = {name: int(value) for name, value in dataset_json["labels"].items() if int(value)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = nnunet.model_folder_from_weights(Path(tmp) / "model", ctx.store.read_json(experiment, "plans"),
                                                  ctx.store.read_json(experiment, "dataset"), dict(weights))
        rows = case_rows(nnunet.load_predictor(folder, ctx.device), raw, labels)
    # The per-case rows stay at the site, beside the export they were measured on.
    kept = ctx.paths(experiment).root / "evaluations" / f"{checked_name('model', model)}-round{round_}.json"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps({"cohort": cohort, "cohort_version": snapshot.version, "rows": rows}, default=str))
    ctx.log(f"{ctx.site}: {model} model on {cohort} v{snapshot.version}: {len({r['case'] for r in rows})} case(s)")
    return ModelEvaluation(ctx.site, model, cohort, snapshot.version, threshold, check.summary,
                           tuple(summarize_rows(rows, list(labels), threshold)))


__all__ = ["GLOBAL", "EvaluationRefused", "Metric", "MetricSummary", "ModelEvaluation", "case_rows", "check_model",
           "evaluate_at_site", "export_held_out", "parse_evaluation", "summarize", "summarize_rows",
           "training_tags"]
