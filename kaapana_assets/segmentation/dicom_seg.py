"""Write a predicted label volume as a DICOM SEG (highdicom) referencing its source series."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from kaapana_assets import __version__
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


def seg_uids(source_series_uid: str, model_name: str, model_version: str) -> tuple[str, str]:
    """(series UID, SOP instance UID) of the SEG a model version makes from a series:
    deterministic, so segmenting again with the same model is recognised, not duplicated."""
    def uid(kind: str) -> str:
        digest = hashlib.sha256(f"{kind}\x1f{source_series_uid}\x1f{model_name}\x1f{model_version}".encode()).digest()
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"

    return uid("seg-series"), uid("seg-sop")


def write_seg(
    volume: Volume,
    labels: np.ndarray,
    label_names: Mapping[int, str],
    model_name: str,
    model_version: str,
    out: Path,
) -> tuple[Path, list[str]]:
    """Write the SEG; returns its path and the labels it contains (empty ones are left out)."""
    present = [(value, name) for value, name in sorted(label_names.items()) if value and (labels == value).any()]
    if not present:
        raise ValueError("the prediction contains no foreground label: nothing to write")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name, version=str(model_version), family=codes.cid7162.ArtificialIntelligence,
        source="kaapana_assets nnU-Net v2",
    )
    descriptions = []
    label_map = np.zeros(labels.shape, dtype=np.uint8)
    for number, (value, name) in enumerate(present, start=1):
        category, kind = KNOWN_LABELS.get(name.lower(), GENERIC)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        ))
        label_map[labels == value] = number
    series_uid, sop_uid = seg_uids(volume.series_uid, model_name, model_version)
    seg = hd.seg.Segmentation(
        source_images=volume.datasets,
        pixel_array=label_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=900,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="kaapana_assets",
        manufacturer_model_name=model_name,
        software_versions=[__version__, str(model_version)],  # a list: pydicom refuses tuples for LO
        device_serial_number="0",
        content_label="NNUNET",
        content_description=f"{model_name} v{model_version}",
        content_creator_name="kaapana^nnunet",
    )
    seg.SeriesDescription = f"nnU-Net {model_name} v{model_version}"[:64]
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out)
    return out, [name for _, name in present]
