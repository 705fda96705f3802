"""What an extension gets: plain paths of a study's archived files."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES


def study_files(lake: Lake, archive_root: Path, study_uid: str) -> list[str]:
    rows = lake.read(INSTANCES, pl.col("study_uid") == study_uid).sort("series_uid", "instance_number")
    if not rows.height:
        raise LookupError(f"study {study_uid} has no archived instances: materialize dicom_studies first")
    return [str(archive_root / p) for p in rows["archive_path"].to_list()]
