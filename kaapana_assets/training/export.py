"""A cohort version → an nnU-Net raw dataset: CT volumes from the archive and label maps
from each member's reference SEGs, labels named by the SEG segment descriptions. Each label
comes from the SEG instance the cohort version recorded for it (cohorts/references.py);
overlapping segments are painted by the version's label priority, else the smaller on top,
and the overlap is counted. nnU-Net's region-based training (overlapping regions such as
liver ⊇ tumour as separate outputs) would start here: the masks of cohorts/labels.py written
as regions in dataset.json instead of one painted label map.

Refused before anything is written: a version that failed a blocking check (check_records.py)
and one with fewer than two patients (no validation patient the model did not train on).
Slices are read at the `instances` version the snapshot recorded: slices that arrived later
never change an export of the same version."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import polars as pl

from kaapana_assets.cohorts.check_records import require_passed_checks
from kaapana_assets.cohorts.labels import MissingReference, member_labels
from kaapana_assets.cohorts.membership import CohortSnapshot
from kaapana_assets.cohorts.references import reference_sources
from kaapana_assets.ingest.volume import assemble_volume
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES
from kaapana_assets.nnunet import Case, require_patients, write_raw_dataset


class ExportError(ValueError):
    pass


class ReferenceSourceEntry(TypedDict):
    seg_series_uid: str
    seg_sop_instance_uid: str


class ExportedCase(TypedDict):
    """One case of an export, as cases.json lists it."""

    case: str  # the nnU-Net case name, case0000 ...
    patient_id: str  # the member's patient, else its series (a patient's cases stay in one fold)
    series_uid: str
    reference_sources: dict[str, ReferenceSourceEntry]  # label → the reference SEG it was painted from
    overlap_voxels: int  # voxels two or more reference labels claim
    hidden_voxels: dict[str, int]  # label → its voxels a label on top took (labels with none left out)


@dataclass
class ExportedDataset:
    folder: Path
    dataset_json: dict
    labels: dict[str, int]
    cases: list[ExportedCase]
    overlap_voxels: int = 0  # all cases: voxels two or more reference labels claim
    hidden_voxels: dict[str, int] = field(default_factory=dict)  # all cases, per label


def label_ids(snapshot: CohortSnapshot, required: list[str]) -> dict[str, int]:
    """Required labels first, in the definition's order, then any other label the
    members' reference SEGs carry, sorted: stable ids for a stable cohort."""
    present = sorted({lab for labels in snapshot.members["reference_labels"].to_list() for lab in labels or []})
    ordered = list(dict.fromkeys([*required, *present]))
    return {name: i + 1 for i, name in enumerate(ordered)}


def _archive_paths(lake: Lake, archive_root: Path, series_uid: str, version: int | None) -> list[Path]:
    rows = lake.read(INSTANCES, pl.col("series_uid") == series_uid, version=version).select("archive_path")
    return [archive_root / p for p in rows["archive_path"].to_list()]


def export_cohort(
    lake: Lake,
    archive_root: Path,
    snapshot: CohortSnapshot,
    folder: Path,
    required_labels: list[str],
    progress: Callable[[int, int], None] | None = None,
) -> ExportedDataset:
    require_passed_checks(lake, snapshot.cohort, snapshot.version)
    require_patients(snapshot.patients, f"cohort {snapshot.cohort} v{snapshot.version}")
    labels = label_ids(snapshot, required_labels)
    cases: list[Case] = []
    manifest: list[ExportedCase] = []
    hidden: Counter[str] = Counter()
    members = snapshot.members.sort("series_uid").iter_rows(named=True)
    for index, member in enumerate(members):
        sources = reference_sources(member)
        if not sources:
            raise ExportError(f"series {member['series_uid']} has no accepted reference SEG (or cohort version "
                              f"{snapshot.version} predates recorded reference sources: materialize the cohort "
                              "again); a training cohort needs one")
        volume = assemble_volume(_archive_paths(lake, archive_root, member["series_uid"], snapshot.instances_table_version))
        try:
            painted = member_labels(lake, archive_root, member, volume, labels, snapshot.instances_table_version)
        except MissingReference as exc:
            raise ExportError(str(exc)) from None
        name = f"case{index:04d}"
        cases.append(Case(name, volume.sitk_image(), volume.sitk_image(painted.labels),
                          member["patient_id"] or member["series_uid"]))
        manifest.append({"case": name, "patient_id": member["patient_id"] or member["series_uid"], "series_uid": member["series_uid"],
                         "reference_sources": {s.label: {"seg_series_uid": s.seg_series_uid,
                                                         "seg_sop_instance_uid": s.seg_sop_instance_uid}
                                               for s in sources},
                         "overlap_voxels": painted.overlap_voxels,
                         "hidden_voxels": {k: v for k, v in painted.hidden_voxels.items() if v}})
        hidden.update(painted.hidden_voxels)
        if progress:
            progress(index + 1, snapshot.size)
    dataset_json = write_raw_dataset(folder, cases, labels, f"cohort {snapshot.cohort} v{snapshot.version}")
    (folder / "cases.json").write_text(json.dumps(manifest, indent=2))
    return ExportedDataset(folder, dataset_json, labels, manifest, sum(c["overlap_voxels"] for c in manifest),
                           {k: v for k, v in sorted(hidden.items()) if v})
