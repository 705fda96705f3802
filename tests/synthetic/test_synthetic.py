"""The synthetic generator: deterministic, non-IID across sites, valid DICOM."""

from __future__ import annotations

import hashlib
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

from kaapana_assets.synthetic import LABELS, SITE_PROFILES, generate_site, get_profile
from kaapana_assets.synthetic.generator import phantom_for
from tests.helpers import SMALL
from tests.tools import dciodvfy_errors


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        ds = pydicom.dcmread(p)
        h.update(ds.SOPInstanceUID.encode())
        h.update(ds.PixelData)
    return h.hexdigest()


def test_same_seed_same_study(tmp_path: Path) -> None:
    a = generate_site("site-b", 1, seed=5, out=tmp_path / "a", **SMALL)[0]
    b = generate_site("site-b", 1, seed=5, out=tmp_path / "b", **SMALL)[0]
    c = generate_site("site-b", 1, seed=6, out=tmp_path / "c", **SMALL)[0]
    assert (a.study_uid, a.series_uid) == (b.study_uid, b.series_uid)
    assert _digest(a.ct_files) == _digest(b.ct_files)
    assert a.study_uid != c.study_uid
    assert _digest(a.ct_files) != _digest(c.ct_files)


def test_sites_are_non_iid() -> None:
    profiles = list(SITE_PROFILES.values())
    assert len({p.manufacturer for p in profiles}) == len(profiles)
    assert len({p.slice_thickness_mm for p in profiles}) == len(profiles)
    assert all(1.0 <= p.slice_thickness_mm <= 5.0 for p in profiles)
    assert all(32 <= p.slices <= 64 and 96 <= p.matrix <= 128 for p in profiles)
    # Intensity distributions differ measurably between sites (noise and calibration).
    stats = []
    for p in profiles:
        ph = phantom_for(p.resized(**SMALL), seed=1, index=0)
        liver = ph.hu[ph.labels == LABELS["liver"]]
        stats.append((round(float(liver.mean())), round(float(liver.std()))))
    assert len(set(stats)) == len(stats)
    assert get_profile("my-hospital").name == "my-hospital"


def test_study_content(corpus: dict) -> None:
    study = corpus["site-a"][1]
    datasets = [pydicom.dcmread(p) for p in study.ct_files]
    assert len(datasets) == SMALL["slices"]
    assert {ds.StudyInstanceUID for ds in datasets} == {study.study_uid}
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    ds = datasets[0]
    assert ds.Modality == "CT" and ds.Manufacturer == SITE_PROFILES["site-a"].manufacturer
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets])
    assert hu.min() < -900  # air
    assert 20 < np.median(hu[hu > -50]) < 120  # soft tissue / liver
    z = [float(d.ImagePositionPatient[2]) for d in datasets]
    assert np.allclose(np.diff(sorted(z)), float(ds.SliceThickness))


def test_reference_seg_reads_back(corpus: dict) -> None:
    study = next(s for s in corpus["site-a"] + corpus["site-b"] if s.lesion_count)
    seg = hd.seg.segread(study.seg_file)
    labels = [d.SegmentLabel for d in seg.SegmentSequence]
    assert labels == study.labels_present and "liver" in labels and "lesion" in labels
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series_uid
    assert str(seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue) == "10200004"  # SCT Liver


def test_synth_cli(tmp_path: Path) -> None:
    from kaapana_assets.cli import main

    assert main(["synth", "--site", "site-c", "--studies", "2", "--seed", "1", "--out", str(tmp_path),
                 "--with-annotations", "--slices", "8", "--matrix", "32"]) == 0
    files = list((tmp_path / "site-c").rglob("*.dcm"))
    assert len(files) == 2 * (8 + 1)


def test_ct_and_seg_pass_dciodvfy(full_size_study) -> None:
    assert dciodvfy_errors(full_size_study.ct_files[0]) == []
    assert dciodvfy_errors(full_size_study.ct_files[-1]) == []
    assert dciodvfy_errors(full_size_study.seg_file) == []
