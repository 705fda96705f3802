"""What an evaluation says: a summary per label, a box plot per label (PNG), and the gate
that can hold back promotion (the blocking check `evaluation_gate`)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TypedDict

import polars as pl

# The metric columns of `evaluations` a summary and the plot show, with their units.
METRICS = {"dice": "Dice", "hd95_mm": "HD95 (mm)", "assd_mm": "ASSD (mm)", "volume_difference_ml": "volume difference (ml)"}


def _mean(values: pl.Series) -> float | None:
    values = values.drop_nulls().drop_nans()
    return round(float(values.mean()), 4) if len(values) else None  # type: ignore[arg-type]


def _median(values: pl.Series) -> float | None:
    values = values.drop_nulls().drop_nans()
    return round(float(values.median()), 4) if len(values) else None  # type: ignore[arg-type]


class LabelSummary(TypedDict):
    """One label's line of an evaluation's summary: a row of the metadata table, MLflow's
    metrics, what the gate reads. None where no case defines the value."""

    label: str
    cases: int
    cases_with_dice: int
    dice_mean: float | None
    dice_median: float | None
    dice_std: float | None
    dice_min: float | None
    hd95_median_mm: float | None
    hd95_mean_mm: float | None
    assd_mean_mm: float | None
    volume_difference_mean_ml: float | None
    volume_difference_mean_abs_ml: float | None


# The summary's values an evaluation logs to MLflow, per label.
LoggedMetric = Literal["dice_mean", "hd95_median_mm", "assd_mean_mm", "volume_difference_mean_ml"]
LOGGED_METRICS: tuple[LoggedMetric, ...] = ("dice_mean", "hd95_median_mm", "assd_mean_mm", "volume_difference_mean_ml")


def summarize(rows: pl.DataFrame) -> list[LabelSummary]:
    """Per label: cases measured, Dice (mean, median, std, min), HD95 (median, mean), ASSD
    (mean), volume difference (mean, mean absolute). Undefined values (null) are left out."""
    out: list[LabelSummary] = []
    for label in rows.sort("label_value")["label"].unique(maintain_order=True).to_list():
        these = rows.filter(pl.col("label") == label)
        dice = these["dice"].drop_nulls()
        out.append({
            "label": label,
            "cases": these.height,
            "cases_with_dice": len(dice),
            "dice_mean": _mean(dice),
            "dice_median": _median(dice),
            "dice_std": round(float(dice.std()), 4) if len(dice) > 1 else None,  # type: ignore[arg-type]
            "dice_min": round(float(dice.min()), 4) if len(dice) else None,  # type: ignore[arg-type]
            "hd95_median_mm": _median(these["hd95_mm"]),
            "hd95_mean_mm": _mean(these["hd95_mm"]),
            "assd_mean_mm": _mean(these["assd_mm"]),
            "volume_difference_mean_ml": _mean(these["volume_difference_ml"]),
            "volume_difference_mean_abs_ml": _mean(these["volume_difference_ml"].abs()),
        })
    return out


@dataclass(frozen=True)
class CaseResult:
    """One evaluated case: where it is (patient, study, the CT series), the SEG the model made
    and the reference SEGs it was measured against, and its Dice per label."""

    patient_id: str
    study_uid: str
    series_uid: str
    predicted_seg_series_uid: str
    reference_seg_series_uids: tuple[str, ...]
    dice: dict[str, float | None]  # label → Dice (null: undefined, both masks empty)


def case_results(rows: pl.DataFrame) -> list[CaseResult]:
    """The rows of one evaluation (a row per case and label) as one result per case, in series order."""
    out = []
    for (series_uid,), these in rows.sort("series_uid", "label_value").group_by("series_uid", maintain_order=True):
        first = these.row(0, named=True)
        out.append(CaseResult(
            patient_id=first["patient_id"] or "", study_uid=first["study_uid"], series_uid=str(series_uid),
            predicted_seg_series_uid=first["predicted_seg_series_uid"],
            reference_seg_series_uids=tuple(dict.fromkeys(u for u in these["reference_seg_series_uid"] if u)),
            dice=dict(zip(these["label"].to_list(), these["dice"].to_list(), strict=True)),
        ))
    return out


def evaluation_title(model: str, cohort: str, cohort_version: int, cases: int | None = None,
                     in_sample_patients: int = 0) -> str:
    """The report's title. An in-sample evaluation (allow_overlap: patients of the cohort version
    are in the model's training data) says so first: its scores flatter the model."""
    title = f"{model} on {cohort} v{cohort_version}" + (f" ({cases} cases)" if cases is not None else "")
    if in_sample_patients:
        return f"IN-SAMPLE, {in_sample_patients} patient(s) in the training data: {title}"
    return title


def box_plot_png(rows: pl.DataFrame, title: str = "", metrics: Sequence[str] = tuple(METRICS)) -> bytes:
    """One panel per metric, one box per label (every case a dot on it)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    labels = rows.sort("label_value")["label"].unique(maintain_order=True).to_list()
    figure = Figure(figsize=(3.2 * len(metrics), 3.4), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axis, metric in zip(axes, metrics, strict=True):
        data = [rows.filter(pl.col("label") == label)[metric].drop_nulls().drop_nans().to_list() for label in labels]
        axis.boxplot([d if d else [math.nan] for d in data], tick_labels=labels, showfliers=False)
        for position, values in enumerate(data, start=1):
            axis.plot([position] * len(values), values, "o", markersize=3, alpha=0.6, color="tab:blue")
        axis.set_title(METRICS.get(metric, metric), fontsize=10)
        if metric == "dice":
            axis.set_ylim(-0.02, 1.02)
        axis.grid(axis="y", alpha=0.3)
    if title:
        figure.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


@dataclass(frozen=True)
class GateOutcome:
    passed: bool
    description: str
    values: dict[str, float | None] = field(default_factory=dict)


def gate(summary: Sequence[LabelSummary], labels: Sequence[str], min_dice: float = 0.0,
         max_hd95_mm: float = 0.0) -> GateOutcome:
    """Mean Dice of each gated label ≥ `min_dice` and, when `max_hd95_mm` > 0, its median
    HD95 ≤ `max_hd95_mm`. Gated labels: `labels` (a cohort's required labels), else every
    evaluated label. With the defaults (0, 0) the gate only asks that each gated label was
    measured: it is off for promotion purposes."""
    by_label = {s["label"]: s for s in summary}
    gated = [label for label in labels if label] or list(by_label)
    problems, values = [], {}
    for label in gated:
        row = by_label.get(label)
        dice = row["dice_mean"] if row else None
        hd95 = row["hd95_median_mm"] if row else None
        values[f"dice_mean_{label}"], values[f"hd95_median_mm_{label}"] = dice, hd95
        if dice is None:
            problems.append(f"{label}: not measured")
            continue
        if dice < min_dice:
            problems.append(f"{label}: mean Dice {dice:.3f} < {min_dice:g}")
        if max_hd95_mm > 0 and (hd95 is None or hd95 > max_hd95_mm):
            problems.append(f"{label}: median HD95 {hd95 if hd95 is None else f'{hd95:.1f}'} mm > {max_hd95_mm:g} mm")
    thresholds = f"mean Dice ≥ {min_dice:g}" + (f", median HD95 ≤ {max_hd95_mm:g} mm" if max_hd95_mm > 0 else "")
    if problems:
        return GateOutcome(False, f"{thresholds}: " + "; ".join(problems), values)
    measured = ", ".join(f"{label} {by_label[label]['dice_mean']:.3f}" for label in gated)
    return GateOutcome(True, f"{thresholds}: mean Dice {measured}", values)
