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
from kaapana_assets.lake.schemas import COHORT_MEMBERS, QUARANTINE, SERIES, STUDIES

# name -> help text; label names per metric below.
METRICS = {
    "kaapana_dicom_patients_total": "Distinct patients in the index",
    "kaapana_dicom_studies_total": "Studies in the index",
    "kaapana_dicom_series_total": "Series in the index, by modality",
    "kaapana_dicom_instances_total": "Instances in the index, by modality",
    "kaapana_dicom_quarantined_total": "Files in quarantine, by reason",
    "kaapana_cohort_series": "Series in the latest version of each cohort",
}
LABELS = {
    "kaapana_dicom_series_total": ("modality",),
    "kaapana_dicom_instances_total": ("modality",),
    "kaapana_dicom_quarantined_total": ("reason",),
    "kaapana_cohort_series": ("cohort", "version"),
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
        for cohort, version, count in sizes.group_by("cohort", "v").len().sort("cohort").iter_rows():
            samples.append(Sample("kaapana_cohort_series", {"cohort": cohort, "version": str(version)}, float(count)))
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
