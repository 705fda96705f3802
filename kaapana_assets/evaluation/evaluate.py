"""Evaluate a model version on a cohort version: every member with a reference SEG is
segmented with the model (the platform's own segmentation: a DICOM SEG archived and indexed,
reused when this model version already segmented the series), both SEGs are read back onto
the CT volume with the platform's own reader, and every label is measured (metrics.py).
Rows go to the Delta table `evaluations`, keyed by cohort version, model version, case
(series) and label.

Which labels: those the model predicts and the cohort's reference SEGs carry. In a case whose
references lack one of them, that label counts as absent (an empty reference): the
platform's SEGs leave empty segments out, so absence in a reference SEG means "not there".

Which SEG is the reference: per label, the SEG instance the cohort version recorded
(cohorts/references.py: accepted algorithm types, never this platform's output, the most
recent where several hold the label), read and painted as the nnU-Net export reads it
(cohorts/labels.py). Each row names the SEG series its label came from.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from kaapana_assets.archive.service import Archive
from kaapana_assets.cohorts.labels import MissingReference, member_labels
from kaapana_assets.cohorts.membership import CohortSnapshot
from kaapana_assets.cohorts.references import reference_sources
from kaapana_assets.evaluation.metrics import LabelMetrics, case_metrics
from kaapana_assets.ingest.volume import VolumeError, assemble_volume, seg_labels
from kaapana_assets.lake import Lake
from kaapana_assets.lake.digest import row_digest
from kaapana_assets.lake.schemas import EVALUATIONS, INSTANCES, SEGMENTATIONS
from kaapana_assets.segmentation.models import LoadedModel
from kaapana_assets.segmentation.segment import NothingToSegment, segment_study


class EvaluationError(ValueError):
    """Nothing could be evaluated (no member with a reference, no common label)."""


def evaluation_id(cohort: str, cohort_version: int, model_name: str, model_version: str) -> str:
    """One evaluation: a model version measured on a cohort version (stable, 16 hex digits)."""
    return hashlib.sha256(f"{cohort}\x00{cohort_version}\x00{model_name}\x00{model_version}".encode()).hexdigest()[:16]


@dataclass
class Evaluation:
    evaluation_id: str
    cohort: str
    cohort_version: int
    model_name: str
    model_version: str
    labels: dict[str, int]  # evaluated label → value in the model's label volume
    rows: pl.DataFrame  # this evaluation's rows of the `evaluations` table
    skipped: list[dict[str, str]] = field(default_factory=list)  # series_uid, reason
    versions: dict[str, int | None] = field(default_factory=dict)  # Delta versions read and written

    @property
    def model(self) -> str:
        return f"{self.model_name}:v{self.model_version}"

    @property
    def cases(self) -> int:
        return self.rows["series_uid"].n_unique() if self.rows.height else 0


def archive_paths(lake: Lake, archive_root: Path, series_uid: str, version: int | None = None) -> list[Path]:
    """A series' files in the archive, as `instances` lists them at `version` (a cohort
    version's pinned slices), or now."""
    rows = lake.read(INSTANCES, pl.col("series_uid") == series_uid, version=version).sort("instance_number")
    return [archive_root / p for p in rows["archive_path"].to_list()]


def evaluated_labels(snapshot: CohortSnapshot, model: LoadedModel) -> dict[str, int]:
    annotated = {lab for labels in snapshot.members["reference_labels"].to_list() for lab in labels or []}
    return {name: value for value, name in sorted(model.label_names.items()) if value and name in annotated}


def _number(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def metric_row(name: str, value: int, metrics: LabelMetrics) -> dict[str, Any]:
    return {
        "label": name, "label_value": value, "dice": _number(metrics.dice, 6), "hd95_mm": _number(metrics.hd95_mm),
        "hausdorff_mm": _number(metrics.hausdorff_mm), "assd_mm": _number(metrics.assd_mm),
        "reference_voxels": metrics.reference_voxels, "predicted_voxels": metrics.predicted_voxels,
        "reference_ml": _number(metrics.reference_ml, 3), "predicted_ml": _number(metrics.predicted_ml, 3),
        "volume_difference_ml": _number(metrics.volume_difference_ml, 3),
    }


def evaluate_cohort(
    archive: Archive,
    snapshot: CohortSnapshot,
    model: LoadedModel,
    progress: Callable[[int, int, str], None] | None = None,
) -> Evaluation:
    """Segment and measure every member with a reference; write the rows; return them."""
    labels = evaluated_labels(snapshot, model)
    if not labels:
        known = sorted(n for v, n in model.label_names.items() if v)
        raise EvaluationError(f"{model.ref} predicts {known}; cohort {snapshot.cohort} v{snapshot.version} has no "
                              f"reference SEG with any of these labels")
    lake = archive.lake
    ident = evaluation_id(snapshot.cohort, snapshot.version, model.name, model.version)
    read_versions = lake.versions((INSTANCES, SEGMENTATIONS))
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    now = dt.datetime.now(dt.timezone.utc)
    members = list(snapshot.members.sort("series_uid").iter_rows(named=True))
    for index, member in enumerate(members):
        series_uid = member["series_uid"]
        sources = {s.label: s.seg_series_uid for s in reference_sources(member)}
        if not sources:
            skipped.append({"series_uid": series_uid, "reason": "no reference SEG"})
            continue
        try:
            result = segment_study(archive, member["study_uid"], model)
            if result.series_uid != series_uid:
                raise NothingToSegment(f"the study's segmentation reads series {result.series_uid}, not this member")
            # The member and its reference as the cohort version pinned them; the prediction is new.
            pinned = snapshot.instances_table_version
            volume = assemble_volume(archive_paths(lake, archive.root, series_uid, pinned))
            predicted_path = archive.root / lake.read(
                INSTANCES, pl.col("sop_instance_uid") == result.seg_sop_uid)["archive_path"][0]
            truth = member_labels(lake, archive.root, member, volume, labels, pinned).labels
            predicted = seg_labels(predicted_path, volume, labels)
        except (VolumeError, NothingToSegment, MissingReference) as exc:
            skipped.append({"series_uid": series_uid, "reason": str(exc)})
            continue
        case = {
            "evaluation_id": ident, "cohort": snapshot.cohort, "cohort_version": snapshot.version,
            "model_name": model.name, "model_version": model.version, "series_uid": series_uid,
            "study_uid": member["study_uid"], "patient_id": member["patient_id"],
            "predicted_seg_series_uid": result.seg_series_uid,
            "predicted_seg_sop_instance_uid": result.seg_sop_uid, "spacing_zyx": list(volume.spacing_zyx),
            "series_table_version": snapshot.series_table_version,
        }
        for name, metrics in case_metrics(truth, predicted, volume.spacing_zyx, labels).items():
            row = {**case, "reference_seg_series_uid": sources.get(name), **metric_row(name, labels[name], metrics)}
            row["row_digest"] = row_digest(row)
            rows.append({**row, "evaluated_at": now})
        if progress:
            progress(index + 1, len(members), series_uid)
    if not rows:
        reasons = "; ".join(f"{s['series_uid']}: {s['reason']}" for s in skipped[:3])
        raise EvaluationError(f"no member of cohort {snapshot.cohort} v{snapshot.version} could be evaluated: {reasons}")
    written = lake.merge(EVALUATIONS, pa.Table.from_pylist(rows, schema=EVALUATIONS.schema))
    return Evaluation(
        ident, snapshot.cohort, snapshot.version, model.name, model.version, labels,
        read_evaluation(lake, ident), skipped,
        versions={"series": snapshot.series_table_version, "tags": snapshot.tags_table_version, **read_versions,
                  "cohort_instances": snapshot.instances_table_version, "evaluations": written.version},
    )


def read_evaluation(lake: Lake, ident: str) -> pl.DataFrame:
    if not lake.exists(EVALUATIONS):
        return pl.from_arrow(EVALUATIONS.empty())  # type: ignore[return-value]
    return lake.read(EVALUATIONS, pl.col("evaluation_id") == ident).sort("series_uid", "label_value")
