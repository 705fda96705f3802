"""Viewers read our SEGs: dcmqi's `segimage2itkimage` (the converter 3D Slicer's
QuantitativeReporting uses; `pip install dcmqi`) converts every SEG the platform writes —
the synthetic references (fast) and the model outputs of the demo's evaluation (slow) — into a
label volume equal, voxel for voxel in patient space, to the one our own reader returns."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from kaapana_assets.ingest.volume import assemble_volume, seg_labels
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES, SEGMENTATIONS
from kaapana_assets.synthetic import GeneratedStudy


def segimage2itkimage() -> str:
    """The converter beside this interpreter (the venv's bin), else on PATH; skip if it cannot run."""
    found = Path(sys.executable).with_name("segimage2itkimage")
    binary = str(found) if found.exists() else shutil.which("segimage2itkimage")
    if binary is None:
        pytest.skip("dcmqi's segimage2itkimage is not installed (pip install dcmqi: the dev extra)")
    try:
        probe = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        pytest.skip(f"dcmqi's segimage2itkimage cannot run on this machine: {exc}")
    if probe.returncode != 0:
        pytest.skip(f"dcmqi's segimage2itkimage cannot run on this machine: {probe.stderr.strip()[:200]}")
    return binary


def dcmqi_labels(binary: str, seg_file: Path, ct_files: list[Path], out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(dcmqi's label volume resampled onto the CT's grid, our seg_labels on the same grid),
    both with dcmqi's label numbers."""
    import SimpleITK as sitk

    out.mkdir(parents=True)
    run = subprocess.run([binary, "--inputDICOM", str(seg_file), "--outputDirectory", str(out), "--outputType", "nifti",
                          "--prefix", "seg", "--mergeSegments"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    meta = json.loads((out / "seg-meta.json").read_text())
    images = sorted(out.glob("seg-*.nii.gz"))
    assert len(images) == len(meta["segmentAttributes"]) == 1, "non-overlapping segments merge into one volume"
    ids = {str(segment["SegmentLabel"]): int(segment["labelID"]) for segment in meta["segmentAttributes"][0]}
    volume = assemble_volume(ct_files)
    ours = seg_labels(seg_file, volume, ids)
    reference = volume.sitk_image(np.zeros(volume.hu.shape, np.uint8))
    # dcmqi writes the frames' extent in its own geometry: put it into the CT's voxels by patient
    # coordinates (nearest neighbour; both grids share spacing and direction, so it is exact).
    theirs = sitk.Resample(sitk.Cast(sitk.ReadImage(str(images[0])), sitk.sitkUInt8), reference,
                           sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(theirs), ours


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
