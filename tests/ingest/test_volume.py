"""Volume assembly from a CT series: geometry, ordering, rescale, and clear errors."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest

from kaapana_assets.ingest.volume import VolumeError, assemble_volume
from kaapana_assets.synthetic import generate_site, get_profile
from kaapana_assets.synthetic.generator import phantom_for


@pytest.fixture(scope="module")
def study_c(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    # site-c numbers instances feet-to-head and stores signed pixels: both must not matter.
    return generate_site("site-c", 1, seed=4, out=tmp_path_factory.mktemp("vol"), slices=10, matrix=24)[0]


def test_sorted_by_position_with_rescale(study_c) -> None:  # type: ignore[no-untyped-def]
    files = list(study_c.ct_files)
    random.Random(1).shuffle(files)
    volume = assemble_volume(files)
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.datasets]
    assert z == sorted(z)
    numbers = [int(ds.InstanceNumber) for ds in volume.datasets]
    assert numbers == sorted(numbers, reverse=True)  # descending numbering, ascending position
    truth = phantom_for(get_profile("site-c").resized(10, 24), 4, 0).hu
    assert np.abs(volume.hu - np.clip(np.rint(truth), -1024, 3071)).max() <= 1.0
    assert volume.spacing_zyx[0] == pytest.approx(float(volume.datasets[0].SliceThickness))


def _rewrite(path: Path, target: Path, **changes: object) -> Path:
    ds = pydicom.dcmread(path)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(target, enforce_file_format=True)
    return target


def test_errors_are_clear(study_c, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = sorted(study_c.ct_files)
    with pytest.raises(VolumeError, match="missing slices"):
        assemble_volume(files[:4] + files[5:])
    tilted = _rewrite(files[3], tmp_path / "tilted.dcm", ImageOrientationPatient=[1, 0, 0, 0, 0.9, 0.1])
    with pytest.raises(VolumeError, match="mixed orientation"):
        assemble_volume(files[:3] + [tilted] + files[4:])
    ds = pydicom.dcmread(files[-1])
    moved = _rewrite(files[-1], tmp_path / "moved.dcm",
                     ImagePositionPatient=[*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.7])
    with pytest.raises(VolumeError, match="varying slice spacing|missing slices"):
        assemble_volume(files[:-1] + [moved])
    other = _rewrite(files[0], tmp_path / "other.dcm", SeriesInstanceUID="1.2.3.4")
    with pytest.raises(VolumeError, match="2 series"):
        assemble_volume(files[1:] + [other])
    with pytest.raises(VolumeError, match="no files"):
        assemble_volume([])


def test_remembered_iod_lookups_answer_as_highdicom_does() -> None:
    """volume.py remembers highdicom's IOD attribute lookups (a table scan per slice); for
    every SOP class highdicom knows, the remembered answers are the library's own."""
    from highdicom import _standard_utils as standard

    import kaapana_assets.ingest.volume  # noqa: F401  (installs the cache)

    cached = standard.is_attribute_in_iod
    original = cached.__wrapped__
    assert original is not cached and hasattr(cached, "cache_info")
    def answer(lookup, *args):  # type: ignore[no-untyped-def]
        try:
            return lookup(*args)
        except KeyError as exc:  # highdicom's tables lack some IODs: the same error, never remembered
            return f"KeyError {exc}"

    for sop_class_uid in [*standard.get_sop_class_iod_map(), "1.2.3.4"]:
        for attribute in ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "NumberOfFrames", "PatientID"):
            for excluded in (None, ["IconImageSequence"]):
                expected = answer(original, attribute, sop_class_uid, excluded)
                assert answer(cached, attribute, sop_class_uid, excluded) == expected
                assert answer(cached, attribute, sop_class_uid, excluded) == expected  # from the cache
    assert standard.does_iod_have_pixel_data("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    assert not standard.does_iod_have_pixel_data("1.2.840.10008.5.1.4.1.1.88.33")  # Comprehensive SR
