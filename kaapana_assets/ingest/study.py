"""What a study looks like in the index: its series, counts, a data version, a preview."""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pydicom
from PIL import Image

from kaapana_assets.ingest.headers import is_native_failure
from kaapana_assets.ingest.isolation import IsolatedFailure, run_isolated
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES, SERIES

PREVIEW_SIZE = 160
SOFT_TISSUE_WINDOW = (40.0, 400.0)  # centre, width in HU


@dataclass
class StudySummary:
    study_uid: str
    patient_id: str | None
    instance_count: int
    modalities: list[str]
    series: list[dict[str, Any]]
    data_version: str
    instances_version: int | None

    def series_rows(self) -> list[dict[str, Any]]:
        """One row per series, for the asset's metadata: the description (else the UID's tail),
        counts, slice thickness, completeness and how many reference SEGs point at it."""
        return [
            {
                "series": s.get("series_description") or s["series_uid"][-12:],
                "modality": s["modality"],
                "instances": s["instance_count"],
                "slice_thickness_mm": s.get("slice_thickness"),
                "complete": bool(s["complete"]),
                "reference_segs": len(s.get("reference_seg_series_uids") or []),
            }
            for s in self.series
        ]


def summarize_study(lake: Lake, study_uid: str) -> StudySummary | None:
    version = lake.version(INSTANCES)
    instances = lake.read(INSTANCES, pl.col("study_uid") == study_uid, version=version)
    if instances.height == 0:
        return None
    # The data version is the set of instances and their bytes: re-ingesting the same
    # files gives the same version; one new instance changes it.
    h = hashlib.sha256()
    for sop, sha in sorted(zip(instances["sop_instance_uid"].to_list(), instances["sha256"].to_list(), strict=True)):
        h.update(f"{sop}:{sha}\n".encode())
    series = lake.read(SERIES, pl.col("study_uid") == study_uid).sort("series_number", nulls_last=True).to_dicts()
    return StudySummary(
        study_uid=study_uid,
        patient_id=instances["patient_id"][0],
        instance_count=instances.height,
        modalities=sorted(set(instances["modality"].to_list())),
        series=series,
        data_version=h.hexdigest()[:24],
        instances_version=version,
    )


def combined_version(versions: list[str]) -> str:
    """One data version for the studies of a multi-study run (Dagster records one per run)."""
    return hashlib.sha256("\n".join(versions).encode()).hexdigest()[:24]


def middle_slice_png(paths: list[Path], size: int = PREVIEW_SIZE) -> bytes | None:
    """PNG of the middle slice of an image series (by position along the slice normal),
    in a soft-tissue window. None when the pixels cannot be decoded. Compressed pixels are
    decoded in the isolated decoder process (a hostile stream can abort a codec)."""
    if not paths:
        return None
    try:
        syntax = pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
        if syntax.is_encapsulated:
            return run_isolated(_middle_slice_png, paths, size)
    except IsolatedFailure:
        return None
    except BaseException as exc:
        if not is_native_failure(exc):
            raise
        return None
    return _middle_slice_png(paths, size)


def _middle_slice_png(paths: list[Path], size: int) -> bytes | None:
    try:
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        def z(ds: pydicom.Dataset) -> float:
            pos = ds.get("ImagePositionPatient")
            return float(pos[2]) if pos else float(ds.get("InstanceNumber", 0) or 0)
        order = sorted(range(len(paths)), key=lambda i: z(headers[i]))
        ds = pydicom.dcmread(paths[order[len(order) // 2]])
        pixels = ds.pixel_array.astype(np.float32)
        if pixels.ndim == 3:  # multi-frame: take its middle frame
            pixels = pixels[pixels.shape[0] // 2]
        hu = pixels * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
        centre, width = SOFT_TISSUE_WINDOW
        if ds.get("Modality") != "CT":
            centre, width = float(np.mean(hu)), float(np.ptp(hu) or 1.0)
        img = np.clip((hu - (centre - width / 2)) / width * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(img)
        image.thumbnail((size, size))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    except BaseException as exc:  # a preview is a courtesy: never fail an ingest over it (nor a codec's panic)
        if not is_native_failure(exc):
            raise
        return None


def png_markdown(png: bytes, alt: str = "preview") -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def preview_series_paths(lake: Lake, archive_root: Path, summary: StudySummary) -> list[Path]:
    """Archive files of the study's largest CT (else largest image) series."""
    images = [s for s in summary.series if s["modality"] != "SEG" and s.get("rows")]
    if not images:
        return []
    images.sort(key=lambda s: (s["modality"] != "CT", -s["instance_count"]))
    series_uid = images[0]["series_uid"]
    rows = lake.read(INSTANCES, pl.col("series_uid") == series_uid).select("archive_path")
    return [archive_root / p for p in rows["archive_path"].to_list()]
