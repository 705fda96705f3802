"""Pre-learning harmonization checks on a cohort snapshot. Each returns whether it passed,
a sentence saying why, and the offending series, so a data engineer can act on them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from kaapana_assets.cohorts.definitions import CohortDefinition
from kaapana_assets.cohorts.membership import CohortSnapshot
from kaapana_assets.cohorts.references import missing_labels


@dataclass
class CheckOutcome:
    passed: bool
    description: str
    offending: list[dict[str, Any]] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)


def _offenders(frame: pl.DataFrame, why: str | pl.Expr) -> list[dict[str, Any]]:
    problem = (why if isinstance(why, pl.Expr) else pl.lit(why)).alias("problem")
    cols = [c for c in ("series_uid", "study_uid", "institution") if c in frame.columns]
    return frame.with_columns(problem).select(*cols, "problem").to_dicts()


def single_modality(snapshot: CohortSnapshot, definition: CohortDefinition) -> CheckOutcome:
    counts = Counter(snapshot.members["modality"].to_list())
    if len(counts) <= 1:
        return CheckOutcome(True, f"all series are {next(iter(counts), 'none')}", values={"modalities": dict(counts)})
    majority = counts.most_common(1)[0][0]
    bad = snapshot.members.filter(pl.col("modality") != majority)
    return CheckOutcome(
        False,
        f"{len(counts)} modalities {dict(counts)}; expected one",
        _offenders(bad, pl.format("modality {} (majority {})", pl.col("modality"), pl.lit(majority))),
        {"modalities": dict(counts)},
    )


def _spread(snapshot: CohortSnapshot, column: str, tolerance: float, label: str) -> CheckOutcome:
    values = snapshot.members
    missing = values.filter(pl.col(column).is_null())
    present = values.filter(pl.col(column).is_not_null())
    if present.height == 0:
        return CheckOutcome(False, f"no series has a {label}", _offenders(missing, f"no {label}"))
    numbers = present[column].cast(pl.Float64).to_numpy()
    median, spread = float(np.median(numbers)), float(numbers.max() - numbers.min())
    far = present.filter((pl.col(column) - median).abs() > tolerance / 2)
    offending = _offenders(missing, f"no {label}") + _offenders(
        far, pl.format(f"{label} {{}} mm, cohort median {median:g} mm", pl.col(column))
    )
    passed = spread <= tolerance and not missing.height
    return CheckOutcome(
        passed,
        f"{label} spread {spread:g} mm (tolerance {tolerance:g} mm, median {median:g} mm)",
        [] if passed else offending,
        {"spread_mm": spread, "median_mm": median, "tolerance_mm": tolerance},
    )


def slice_thickness_spread(snapshot: CohortSnapshot, definition: CohortDefinition) -> CheckOutcome:
    return _spread(snapshot, "slice_thickness", definition.harmonization.slice_thickness_tolerance_mm, "slice thickness")


def pixel_spacing_spread(snapshot: CohortSnapshot, definition: CohortDefinition) -> CheckOutcome:
    return _spread(snapshot, "row_spacing", definition.harmonization.pixel_spacing_tolerance_mm, "pixel spacing")


def _all_true(snapshot: CohortSnapshot, required: bool, column: str, passed: str, failed: str,
              why: str | pl.Expr) -> CheckOutcome:
    """Every member has `column` true (a missing value counts as false)."""
    if not required:
        return CheckOutcome(True, "not required by the definition")
    bad = snapshot.members.filter(~pl.col(column).fill_null(False))
    return CheckOutcome(bad.height == 0, passed if bad.height == 0 else f"{bad.height} series {failed}",
                        _offenders(bad, why))


def axial_orientation(snapshot: CohortSnapshot, definition: CohortDefinition) -> CheckOutcome:
    return _all_true(snapshot, definition.harmonization.require_axial, "is_axial", "all series are axial",
                     "are not axial", "not axial (or no orientation)")


def series_complete(snapshot: CohortSnapshot, definition: CohortDefinition) -> CheckOutcome:
    gaps = pl.col("missing_instance_numbers").cast(pl.List(pl.String)).list.join(",")
    return _all_true(snapshot, definition.harmonization.require_complete, "complete", "no InstanceNumber gaps",
                     "have InstanceNumber gaps", pl.format("missing instances {}", gaps))


def reference_segmentations(snapshot: CohortSnapshot, definition: CohortDefinition) -> CheckOutcome:
    """Every member has an accepted reference SEG holding every required label: the same
    references and the same rule (cohorts/references.py) as `has_reference_segmentation`."""
    if definition.purpose != "train":
        return CheckOutcome(True, f"not required for a {definition.purpose} cohort")
    required = set(definition.required_labels)
    frame = snapshot.members.with_columns(
        pl.col("reference_labels").fill_null([]).alias("labels"),
        (pl.col("reference_seg_series_uids").list.len() == 0).alias("no_seg"),
    )
    offending: list[dict[str, Any]] = []
    for row in frame.iter_rows(named=True):
        missing = missing_labels(row["labels"], definition.required_labels)
        if row["no_seg"]:
            offending.append({"series_uid": row["series_uid"], "study_uid": row["study_uid"],
                              "institution": row.get("institution"), "problem": "no reference SEG"})
        elif missing:
            offending.append({"series_uid": row["series_uid"], "study_uid": row["study_uid"],
                              "institution": row.get("institution"), "problem": f"reference SEG lacks {missing}"})
    return CheckOutcome(
        not offending,
        f"every series has a reference SEG with {sorted(required)}" if not offending
        else f"{len(offending)} series lack a reference SEG with {sorted(required)}",
        offending,
    )


def minimum_size(snapshot: CohortSnapshot, definition: CohortDefinition) -> CheckOutcome:
    """At least min_size patients: series of one patient are not independent cases (a member
    without a PatientID counts as a patient of its own)."""
    need = definition.harmonization.min_size
    patients = len(snapshot.patients)
    return CheckOutcome(
        patients >= need, f"{patients} patient(s) in {snapshot.size} series (minimum {need} patients)",
        values={"patients": patients, "series": snapshot.size, "minimum": need},
    )


CHECKS: dict[str, Callable[[CohortSnapshot, CohortDefinition], CheckOutcome]] = {
    "single_modality": single_modality,
    "slice_thickness_spread": slice_thickness_spread,
    "pixel_spacing_spread": pixel_spacing_spread,
    "axial_orientation": axial_orientation,
    "series_complete": series_complete,
    "reference_segmentations": reference_segmentations,
    "minimum_size": minimum_size,
}


def offending_rows(offending: list[dict[str, Any]], limit: int = 50) -> list[dict[str, str | None]]:
    """The first `limit` offending series, one row each (the check's metadata counts them all)."""
    return [
        {"series_uid": o["series_uid"], "study_uid": o.get("study_uid"), "site": o.get("institution"),
         "problem": o["problem"]}
        for o in offending[:limit]
    ]
