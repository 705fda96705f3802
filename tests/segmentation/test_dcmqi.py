"""Viewers read our SEGs: dcmqi's `segimage2itkimage` (the converter 3D Slicer's
QuantitativeReporting uses; `pip install dcmqi`) converts every SEG the platform writes —
the synthetic references (fast) and the model outputs of the demo's evaluation (slow) — into a
label volume equal, voxel for voxel in patient space, to the one our own reader returns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES, SEGMENTATIONS
from kaapana_assets.synthetic import GeneratedStudy
from tests.helpers import dcmqi_labels, segimage2itkimage


def test_dcmqi_reads_the_reference_segs(corpus: dict[str, list[GeneratedStudy]], tmp_path: Path) -> None:
    binary = segimage2itkimage()
    studies = [s for site in corpus.values() for s in site]
    for study in studies:
        assert study.seg_file is not None
        theirs, ours = dcmqi_labels(binary, study.seg_file, study.ct_files, tmp_path / study.study_uid)
        assert ours.any() and np.array_equal(theirs, ours), study.seg_file


@pytest.mark.slow  # the session's demo and evaluation
@pytest.mark.timeout(1500)
def test_dcmqi_reads_every_seg_of_the_evaluated_demo(evaluated_demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    binary = segimage2itkimage()
    home = evaluated_demo.home
    lake = Lake(home.lake)
    segs = lake.read(INSTANCES, pl.col("modality") == "SEG").sort("sop_instance_uid")
    written = set(lake.read(SEGMENTATIONS)["seg_sop_instance_uid"].to_list())
    assert len(written) >= 7 and written <= set(segs["sop_instance_uid"].to_list())  # model outputs among them
    for seg in segs.iter_rows(named=True):
        [source] = seg["referenced_series_uids"]
        ct = lake.read(INSTANCES, pl.col("series_uid") == source)["archive_path"].to_list()
        theirs, ours = dcmqi_labels(binary, home.archive / seg["archive_path"], [home.archive / p for p in ct],
                                    tmp_path / seg["sop_instance_uid"])
        assert ours.any() and np.array_equal(theirs, ours), seg["sop_instance_uid"]
