"""Write a predicted label volume as a DICOM SEG (highdicom) referencing its source series."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes

from kaapana_assets import __version__
from kaapana_assets.dicom.columns import HEADER_COLUMNS
from kaapana_assets.dicom.seg_segments import PLATFORM_ALGORITHM_SOURCE, PLATFORM_MANUFACTURER
from kaapana_assets.dicom.uids import deterministic_uid
from kaapana_assets.ingest.volume import Volume

# Coded segment descriptions for label names we know; anything else is a generic tissue.
KNOWN_LABELS = {
    "liver": (codes.SCT.AnatomicalStructure, codes.SCT.Liver),
    "lesion": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion),
    "tumor": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
    "kidney": (codes.SCT.AnatomicalStructure, codes.SCT.Kidney),
    "spleen": (codes.SCT.AnatomicalStructure, codes.SCT.Spleen),
}
GENERIC = (codes.SCT.Tissue, codes.SCT.Tissue)


@dataclass(frozen=True)
class SegAuthor:
    """Who made the segmentation, as the SEG's equipment and content attributes say."""

    model_name: str  # ManufacturerModelName
    software_versions: list[str]  # a list: pydicom refuses tuples for LO
    content_label: str
    content_description: str
    content_creator_name: str
    series_number: int
    series_description: str
    algorithm: hd.AlgorithmIdentificationSequence | None = None  # None: a manual (reference) annotation


def seg_uids(source_series_uid: str, model_name: str, model_version: str) -> tuple[str, str]:
    """(series UID, SOP instance UID) of the SEG a model version makes from a series:
    deterministic, so segmenting again with the same model is recognised, not duplicated."""
    return (deterministic_uid("seg-series", source_series_uid, model_name, model_version),
            deterministic_uid("seg-sop", source_series_uid, model_name, model_version))


def build_seg(
    source_images: Sequence[Dataset],
    labels: np.ndarray,
    label_names: Mapping[int, str],
    author: SegAuthor,
    series_uid: str,
    sop_uid: str,
) -> tuple[hd.seg.Segmentation, list[str]]:
    """The one DICOM SEG builder (highdicom): a binary segment per label value present in
    `labels` (z, y, x, aligned with `source_images`), coded where the label name is known.
    Returns the SEG and the label names it contains (empty labels are left out)."""
    present = [(value, name) for value, name in sorted(label_names.items()) if value and (labels == value).any()]
    if not present:
        raise ValueError("the label volume contains no foreground label: nothing to write")
    kind = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if author.algorithm else hd.seg.SegmentAlgorithmTypeValues.MANUAL
    descriptions = []
    for number, (_, name) in enumerate(present, start=1):
        category, property_type = KNOWN_LABELS.get(name.lower(), GENERIC)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=category,
            segmented_property_type=property_type, algorithm_type=kind, algorithm_identification=author.algorithm,
        ))
    if (labels.dtype == np.uint8 and int(labels.max()) <= len(present)
            and all(value == number for number, (value, _) in enumerate(present, start=1))):
        label_map = labels  # already segment numbers 1..n, nothing else (the usual prediction): no relabelled copy
    else:
        label_map = np.zeros(labels.shape, dtype=np.uint8)
        for number, (value, _) in enumerate(present, start=1):
            label_map[labels == value] = number
    seg = hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=label_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=author.series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=PLATFORM_MANUFACTURER,
        manufacturer_model_name=author.model_name,
        software_versions=author.software_versions,  # type: ignore[arg-type]  # highdicom types it str | tuple
        device_serial_number="0",
        content_label=author.content_label,
        content_description=author.content_description,
        content_creator_name=author.content_creator_name,
    )
    seg.SeriesDescription = author.series_description[:64]
    return seg, [name for _, name in present]


def encode_seg(seg: Dataset) -> bytes:
    """The SEG as Part 10 bytes, in memory: they are hashed and archived as they are, with no
    temporary file to write and read back."""
    buffer = io.BytesIO()
    seg.save_as(buffer)
    return buffer.getvalue()


def model_seg(
    volume: Volume,
    labels: np.ndarray,
    label_names: Mapping[int, str],
    model_name: str,
    model_version: str,
) -> tuple[hd.seg.Segmentation, list[str]]:
    """A model's prediction as a SEG (not yet encoded) and the labels it contains."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name, version=str(model_version), family=codes.cid7162.ArtificialIntelligence,
        source=PLATFORM_ALGORITHM_SOURCE,  # what makes it ours, never a reference (made_by_platform)
    )
    author = SegAuthor(
        model_name=model_name, software_versions=[__version__, str(model_version)], content_label="NNUNET",
        content_description=f"{model_name} v{model_version}", content_creator_name="kaapana^nnunet",
        series_number=900, series_description=f"nnU-Net {model_name} v{model_version}", algorithm=algorithm,
    )
    return build_seg(volume.datasets, labels, label_names, author, *seg_uids(volume.series_uid, model_name, model_version))


def write_seg(
    volume: Volume,
    labels: np.ndarray,
    label_names: Mapping[int, str],
    model_name: str,
    model_version: str,
    out: Path,
) -> tuple[Path, list[str]]:
    """Write a model's prediction as a SEG file; returns its path and the labels it contains."""
    seg, present = model_seg(volume, labels, label_names, model_name, model_version)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode_seg(seg))
    return out, present


def _text(value: Any) -> str | None:
    return str(value).strip(" \x00") or None


def _column_value(value: Any, kind: str) -> Any:
    """One attribute of the in-memory data set as the header parser decodes it from the file
    (HEADER_COLUMNS kinds): the index row is built without reading the file back."""
    if value is None or value == "":
        return [] if kind == "strs" else None
    if kind in ("str", "uid"):
        return _text(value)
    if kind == "pn":  # person names compare without empty trailing components, as parsed
        text = _text(value) or ""
        return "=".join(group.rstrip("^ ") for group in text.split("=")).rstrip("=") or None
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    if kind == "strs":
        return [str(v) for v in values if str(v)]
    if kind == "int":
        return int(float(values[0]))
    if kind == "float":
        return float(values[0])
    return [float(v) for v in values]  # floats


def seg_instance_row(seg: Dataset, transfer_syntax_uid: str) -> dict[str, Any]:
    """The `instances` header columns of a SEG we built: the values `parse_header` reads from
    its encoded bytes (tests/segmentation/test_segmentation.py proves them equal), without the re-parse.
    No AE titles: the SEG was made here, not received."""
    derived = {
        "TransferSyntaxUID": transfer_syntax_uid,
        "ReferencedSeriesUIDs": [str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])
                                 if "SeriesInstanceUID" in item],
        "SegmentLabels": [str(item.SegmentLabel) for item in seg.get("SegmentSequence", []) if "SegmentLabel" in item],
        "CallingAETitle": None,
        "CalledAETitle": None,
    }
    row = {}
    for column in HEADER_COLUMNS:
        value = derived[column.source] if column.source in derived else seg.get(column.source)
        row[column.column] = _column_value(value, column.kind)
    row["modality"] = str(row["modality"]).upper()
    return row
