"""Site statistics: what a site reports to a network monitor (RACOON-style figures),
as rows for the `site_statistics` table and as an OpenMetrics text file that Prometheus'
node-exporter textfile collector reads."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.openmetrics.exposition import generate_latest

from kaapana_assets.files import write_atomically
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import COHORT_MEMBERS, QUARANTINE, SERIES, SERIES_PROJECTS, STUDIES
from kaapana_assets.projects.membership import DEFAULT_PROJECT

# name -> help text; label names per metric below.
METRICS = {
    "kaapana_dicom_patients_total": "Distinct patients in the index",
    "kaapana_dicom_studies_total": "Studies in the index",
    "kaapana_dicom_series_total": "Series in the index, by modality",
    "kaapana_dicom_instances_total": "Instances in the index, by modality",
    "kaapana_dicom_quarantined_total": "Files in quarantine, by reason",
    "kaapana_cohort_series": "Series in the latest version of each cohort, with its project",
    # A series shared between projects counts in each: these do not add up to the totals above.
    "kaapana_project_patients": "Distinct patients with a series in the project",
    "kaapana_project_studies": "Studies with a series in the project",
    "kaapana_project_series": "Series in the project, by modality",
    "kaapana_project_instances": "Instances of the project's series, by modality",
}
LABELS = {
    "kaapana_dicom_series_total": ("modality",),
    "kaapana_dicom_instances_total": ("modality",),
    "kaapana_dicom_quarantined_total": ("reason",),
    "kaapana_cohort_series": ("cohort", "version", "project"),
    "kaapana_project_patients": ("project",),
    "kaapana_project_studies": ("project",),
    "kaapana_project_series": ("project", "modality"),
    "kaapana_project_instances": ("project", "modality"),
}


@dataclass
class Sample:
    metric: str
    labels: dict[str, str]
    value: float


def compute_statistics(lake: Lake) -> list[Sample]:
    series = lake.read(SERIES)
    studies = lake.read(STUDIES)
    quarantine = lake.read(QUARANTINE)
    members = lake.read(COHORT_MEMBERS)
    samples = [
        Sample("kaapana_dicom_patients_total", {}, float(studies["patient_id"].n_unique() if studies.height else 0)),
        Sample("kaapana_dicom_studies_total", {}, float(studies.height)),
    ]
    by_modality = series.group_by("modality").agg(pl.len().alias("series"), pl.col("instance_count").sum().alias("instances"))
    for row in by_modality.sort("modality").iter_rows(named=True):
        samples.append(Sample("kaapana_dicom_series_total", {"modality": row["modality"]}, float(row["series"])))
        samples.append(Sample("kaapana_dicom_instances_total", {"modality": row["modality"]}, float(row["instances"])))
    for reason, count in quarantine.group_by("reason").len().sort("reason").iter_rows():
        samples.append(Sample("kaapana_dicom_quarantined_total", {"reason": reason}, float(count)))
    if members.height:
        latest = members.group_by("cohort").agg(pl.col("cohort_version").max().alias("v"))
        sizes = members.join(latest, on="cohort").filter(pl.col("cohort_version") == pl.col("v"))
        # Versions cut before projects carry none: they belong to the default project.
        project = pl.col("project").fill_null(DEFAULT_PROJECT) if "project" in sizes.columns else pl.lit(DEFAULT_PROJECT)
        for cohort, version, owner, count in (sizes.with_columns(project.alias("project"))
                                              .group_by("cohort", "v", "project").len().sort("cohort").iter_rows()):
            samples.append(Sample("kaapana_cohort_series", {"cohort": cohort, "version": str(version),
                                                            "project": owner}, float(count)))
    return samples + _project_samples(lake.read(SERIES_PROJECTS), series, studies)


def _project_samples(assigned: pl.DataFrame, series: pl.DataFrame, studies: pl.DataFrame) -> list[Sample]:
    """Each project's patients, studies, and series and instances by modality: over the indexed
    series it holds now."""
    held = assigned.select("series_uid", "project").join(
        series.select("series_uid", "study_uid", "modality", "instance_count"), on="series_uid", how="inner").join(
        studies.select("study_uid", "patient_id"), on="study_uid", how="left")
    samples: list[Sample] = []
    for row in held.group_by("project").agg(pl.col("patient_id").drop_nulls().n_unique().alias("patients"),
                                            pl.col("study_uid").n_unique().alias("studies")).sort("project").iter_rows(
            named=True):
        samples.append(Sample("kaapana_project_patients", {"project": row["project"]}, float(row["patients"])))
        samples.append(Sample("kaapana_project_studies", {"project": row["project"]}, float(row["studies"])))
    for row in held.group_by("project", "modality").agg(pl.len().alias("series"), pl.col("instance_count").sum()
                                                        .alias("instances")).sort("project", "modality").iter_rows(
            named=True):
        labels = {"project": row["project"], "modality": row["modality"]}
        samples.append(Sample("kaapana_project_series", labels, float(row["series"])))
        samples.append(Sample("kaapana_project_instances", labels, float(row["instances"])))
    return samples


def openmetrics_text(samples: list[Sample], site: str) -> str:
    registry = CollectorRegistry()
    gauges = {
        name: Gauge(name, help_text, ("site", *LABELS.get(name, ())), registry=registry)
        for name, help_text in METRICS.items()
    }
    for s in samples:
        gauges[s.metric].labels(site=site, **s.labels).set(s.value)
    return generate_latest(registry).decode()


def write_textfile(path: Path, text: str) -> None:
    """Atomic replace: the textfile collector must never read a half-written file."""
    write_atomically(path, text.encode())


def statistics_rows(samples: list[Sample], site: str, snapshot_id: str, now: dt.datetime) -> list[dict]:
    return [
        {"snapshot_id": snapshot_id, "site": site, "metric": s.metric, "labels": json.dumps(s.labels, sort_keys=True),
         "value": s.value, "computed_at": now}
        for s in samples
    ]


def statistics_table(samples: list[Sample]) -> list[dict[str, str | float]]:
    """One row per sample, its labels as `name=value, ...`: what the asset's metadata shows."""
    return [
        {"metric": s.metric, "labels": ", ".join(f"{k}={v}" for k, v in s.labels.items()), "value": s.value}
        for s in samples
    ]
