"""nnU-Net's raw dataset convention: stable ids and names, the raw folder, and the
train/validation split by patient."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def dataset_id_for(name: str) -> int:
    """A stable nnU-Net dataset id (1–999) for a cohort name."""
    return 1 + int(hashlib.sha256(name.encode()).hexdigest(), 16) % 999


def dataset_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{re.sub(r'[^A-Za-z0-9]+', '', name.title()) or 'Cohort'}"


@dataclass
class Case:
    name: str  # nnU-Net case identifier
    image: Any  # SimpleITK image (HU)
    label: Any  # SimpleITK image (label ids)
    patient_id: str


def write_raw_dataset(folder: Path, cases: list[Case], labels: Mapping[str, int], description: str = "") -> dict:
    """nnU-Net's raw format: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, dataset.json."""
    import SimpleITK as sitk

    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for case in cases:
        sitk.WriteImage(case.image, str(folder / "imagesTr" / f"{case.name}_0000.nii.gz"))
        sitk.WriteImage(case.label, str(folder / "labelsTr" / f"{case.name}.nii.gz"))
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{k: int(v) for k, v in labels.items() if v}},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "description": description,
        # Explicit file lists: without them nnU-Net lists files with a fork()ed Pool of 12,
        # which deadlocks in a process that has threads (a Dagster run, torch) — seen here.
        "dataset": {case.name: {"images": [f"imagesTr/{case.name}_0000.nii.gz"], "label": f"labelsTr/{case.name}.nii.gz"}
                    for case in cases},
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return dataset


class TooFewPatients(ValueError):
    """Fewer than two patients: no validation case that is not also a training case."""


def require_patients(patients: set[str], what: str, minimum: int = 2) -> None:
    """TooFewPatients unless `patients` holds at least `minimum` distinct ids."""
    if len(patients) < minimum:
        shown = ", ".join(sorted(patients)[:5]) or "none"
        raise TooFewPatients(
            f"{what} has {len(patients)} patient(s) ({shown}); training needs at least {minimum}: the validation "
            f"Dice that gates promotion must come from patients the model did not train on")


def patient_split(cases: list[tuple[str, str]], val_fraction: float = 0.2) -> dict[str, list[str]]:
    """Train/validation split by patient (no patient on both sides), deterministic: patients in
    the order of their id's hash, the first round(fraction × patients) of them (at least one,
    never all) for validation. `cases` are (case name, patient id); fewer than two patients is
    TooFewPatients."""
    patients = sorted({p for _, p in cases}, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    require_patients(set(patients), f"a dataset of {len(cases)} case(s)")
    n_val = min(max(1, round(len(patients) * val_fraction)), len(patients) - 1)
    val_patients = set(patients[:n_val])
    return {
        "train": sorted(c for c, p in cases if p not in val_patients),
        "val": sorted(c for c, p in cases if p in val_patients),
    }
