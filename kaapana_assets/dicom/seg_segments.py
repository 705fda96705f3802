"""The segments of SEG instances and who made them, for the `seg_segments` table: per segment
its number, label, algorithm type and identification; per SEG its Manufacturer, Content
Creator and Content Date/Time. Read with pydicom from the archived file's header (SEGs are
rare: no need for the hand-written walker in headers.py), when the archive service indexes
a SEG.

Also the one definition of a SEG this platform's models wrote (`made_by_platform`): the
writer (segmentation/dicom_seg.py) sets these constants, the reference policy
(cohorts/references.py) reads them back from the SEG itself, so a SEG of ours is never
taken for a reference, whatever the `segmentations` table holds."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

# What our SEG writer puts in every SEG (Manufacturer) and, for a model's prediction, in each
# segment's algorithm identification (AlgorithmSource).
PLATFORM_MANUFACTURER = "kaapana_assets"
PLATFORM_ALGORITHM_SOURCE = "kaapana_assets nnU-Net v2"


class AlgorithmType(StrEnum):
    """Segment Algorithm Type (0062,0008)."""

    MANUAL = "MANUAL"
    SEMIAUTOMATIC = "SEMIAUTOMATIC"
    AUTOMATIC = "AUTOMATIC"


def made_by_platform(manufacturer: str | None, algorithm_sources: Iterable[str | None],
                     algorithm_names: Iterable[str | None] = ()) -> bool:
    """A SEG written by this platform's models (here or at another site running it): one of
    its segments names our algorithm source, or our Manufacturer wrote it with an algorithm
    named. Our writer also writes the synthetic reference annotations (Manufacturer ours,
    MANUAL, no algorithm): those are references, as a human's would be."""
    if any(source == PLATFORM_ALGORITHM_SOURCE for source in algorithm_sources):
        return True
    return manufacturer == PLATFORM_MANUFACTURER and any(bool(name) for name in algorithm_names)


def _text(value: Any) -> str | None:
    text = str(value).strip(" \x00") if value is not None else ""
    return text or None


def segment_rows(ds: Dataset) -> list[dict[str, Any]]:
    """One row per segment of a SEG data set (pixel data not needed)."""
    seg = {
        "sop_instance_uid": _text(ds.get("SOPInstanceUID")),
        "series_uid": _text(ds.get("SeriesInstanceUID")),
        "study_uid": _text(ds.get("StudyInstanceUID")),
        "manufacturer": _text(ds.get("Manufacturer")),
        "manufacturer_model": _text(ds.get("ManufacturerModelName")),
        "content_creator_name": _text(ds.get("ContentCreatorName")),
        "content_date": _text(ds.get("ContentDate")),
        "content_time": _text(ds.get("ContentTime")),
    }
    rows = []
    for item in ds.get("SegmentSequence", []):
        if "SegmentNumber" not in item:
            continue
        algorithm = next(iter(item.get("SegmentationAlgorithmIdentificationSequence", [])), None)
        family = next(iter(algorithm.get("AlgorithmFamilyCodeSequence", []) if algorithm else []), None)
        rows.append({
            **seg,
            "segment_number": int(item.SegmentNumber),
            "segment_label": _text(item.get("SegmentLabel")),
            "algorithm_type": (_text(item.get("SegmentAlgorithmType")) or "").upper() or None,
            "algorithm_name": _text(algorithm.get("AlgorithmName")) if algorithm else None,
            "algorithm_family": _text(family.get("CodeMeaning")) if family else None,
            "algorithm_version": _text(algorithm.get("AlgorithmVersion")) if algorithm else None,
            "algorithm_source": _text(algorithm.get("AlgorithmSource")) if algorithm else None,
        })
    return rows


# Only these top-level elements are parsed; pydicom skips the others by their length, so a
# hostile element elsewhere in an archived SEG (a huge or deeply nested sequence the header
# walker let pass) costs no memory here.
SEG_TAGS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Manufacturer", "ManufacturerModelName",
            "ContentCreatorName", "ContentDate", "ContentTime", "SpecificCharacterSet", "SegmentSequence")


def read_segment_rows(path: Path | str) -> list[dict[str, Any]]:
    return segment_rows(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(SEG_TAGS)))

