"""A cohort version → an nnU-Net raw dataset: CT volumes from the archive and label maps
from each member's reference SEG, labels named by the SEG segment descriptions."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from kaapana_assets.cohorts.membership import CohortSnapshot
from kaapana_assets.ingest.volume import assemble_volume, seg_labels
from kaapana_assets.lake import Lake
from kaapana_assets.training.nnunet import Case, write_raw_dataset


class ExportError(ValueError):
    pass


@dataclass
class ExportedDataset:
    folder: Path
    dataset_json: dict
    labels: dict[str, int]
    cases: list[dict[str, str]]  # case, patient_id, series_uid, seg_series_uid


def label_ids(snapshot: CohortSnapshot, required: list[str]) -> dict[str, int]:
    """Required labels first, in the definition's order, then any other label the
    members' reference SEGs carry, sorted: stable ids for a stable cohort."""
    present = sorted({lab for labels in snapshot.members["reference_labels"].to_list() for lab in labels or []})
    ordered = list(dict.fromkeys([*required, *present]))
    return {name: i + 1 for i, name in enumerate(ordered)}


def _archive_paths(lake: Lake, archive_root: Path, series_uid: str) -> list[Path]:
    rows = lake.read("instances", pl.col("series_uid") == series_uid).select("archive_path")
    return [archive_root / p for p in rows["archive_path"].to_list()]


def export_cohort(
    lake: Lake,
    archive_root: Path,
    snapshot: CohortSnapshot,
    folder: Path,
    required_labels: list[str],
    progress: Callable[[int, int], None] | None = None,
) -> ExportedDataset:
    labels = label_ids(snapshot, required_labels)
    cases: list[Case] = []
    manifest: list[dict[str, str]] = []
    members = snapshot.members.sort("series_uid").iter_rows(named=True)
    for index, member in enumerate(members):
        segs = member["reference_seg_series_uids"] or []
        if not segs:
            raise ExportError(f"series {member['series_uid']} has no reference SEG; a training cohort needs one")
        volume = assemble_volume(_archive_paths(lake, archive_root, member["series_uid"]))
        seg_files = _archive_paths(lake, archive_root, segs[0])
        label_volume = seg_labels(seg_files[0], volume, labels)
        name = f"case{index:04d}"
        cases.append(Case(name, volume.sitk_image(), volume.sitk_image(label_volume), member["patient_id"] or name))
        manifest.append({"case": name, "patient_id": member["patient_id"] or "", "series_uid": member["series_uid"],
                         "seg_series_uid": segs[0]})
        if progress:
            progress(index + 1, snapshot.size)
    dataset_json = write_raw_dataset(folder, cases, labels, f"cohort {snapshot.cohort} v{snapshot.version}")
    (folder / "cases.json").write_text(json.dumps(manifest, indent=2))
    return ExportedDataset(folder, dataset_json, labels, manifest)
