"""Write phantom studies as DICOM: one axial CT series per study and, optionally, the
reference annotation as a DICOM SEG (highdicom) that references it. Deterministic by seed:
the same (site, seed, index) gives the same UIDs and pixels."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from kaapana_assets import __version__
from kaapana_assets.dicom.uids import deterministic_uid
from kaapana_assets.segmentation.dicom_seg import SegAuthor, build_seg
from kaapana_assets.synthetic.phantom import LABELS, Phantom, make_phantom
from kaapana_assets.synthetic.profiles import SiteProfile, get_profile

# Every study of a patient after the first is a follow-up; every fourth patient has one,
# so patients, studies and series counts differ, as they do in a real archive.
FOLLOW_UP_EVERY = 4
BASE_DATE = dt.date(2024, 1, 8)



@dataclass
class GeneratedStudy:
    site: str
    index: int
    patient_id: str
    study_uid: str
    series_uid: str
    ct_files: list[Path]
    seg_file: Path | None
    seg_series_uid: str | None
    lesion_count: int
    labels_present: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return self.ct_files + ([self.seg_file] if self.seg_file else [])


# Deterministic UIDs (pydicom's generate_uid ignores its entropy sources when prefix is None).
_uid = deterministic_uid


def study_rng(site: str, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, *site.encode()])


def phantom_for(profile: SiteProfile, seed: int, index: int) -> Phantom:
    """The exact phantom of study `index`: ground truth for Dice without reading the SEG."""
    return make_phantom(profile, study_rng(profile.name, seed, index))


def _patient_of(profile: SiteProfile, index: int) -> tuple[int, int]:
    """(patient number, visit number) for the study index."""
    group, offset = divmod(index, FOLLOW_UP_EVERY + 1)
    if offset == FOLLOW_UP_EVERY:  # follow-up of the group's first patient
        return group * FOLLOW_UP_EVERY, 1
    return group * FOLLOW_UP_EVERY + offset, 0


def _ct_datasets(profile: SiteProfile, seed: int, index: int, phantom: Phantom) -> list[Dataset]:
    site = profile.name
    patient_no, visit = _patient_of(profile, index)
    patient_id = f"{site.upper()}-{patient_no:04d}"
    study_uid = _uid("study", site, seed, index)
    series_uid = _uid("series", site, seed, index)
    frame_uid = _uid("frame", site, seed, index)
    date = (BASE_DATE + dt.timedelta(days=7 * index + 90 * visit)).strftime("%Y%m%d")
    birth = dt.date(1940 + (patient_no * 7) % 50, 1 + patient_no % 12, 1 + patient_no % 28)

    nz, n = profile.slices, profile.matrix
    dz, dxy = phantom.spacing_zyx[0], phantom.spacing_zyx[1]
    intercept = 0.0 if profile.signed_pixels else -1024.0
    stored = np.rint(phantom.hu - intercept)
    if profile.signed_pixels:
        stored = np.clip(stored, -1024, 3071).astype(np.int16)
    else:
        stored = np.clip(stored, 0, 4095).astype(np.uint16)
    x0 = -(n - 1) / 2 * dxy
    z0 = -(nz - 1) / 2 * dz

    datasets = []
    for k in range(nz):
        sop_uid = _uid("sop", site, seed, index, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "093000"
        ds.AccessionNumber = f"{site[-1].upper()}{index:06d}"
        ds.Modality = "CT"
        ds.Manufacturer = profile.manufacturer
        ds.ManufacturerModelName = profile.model
        ds.InstitutionName = profile.institution
        ds.StationName = f"{site}-ct1"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT ABDOMEN WITH CONTRAST"
        ds.SeriesDescription = "Abdomen 3.0 axial" if not profile.signed_pixels else "ABD PORTAL"
        ds.PatientName = f"Phantom^{site.replace('-', '')}{patient_no:04d}"
        ds.PatientID = patient_id
        ds.PatientBirthDate = birth.strftime("%Y%m%d")
        ds.PatientSex = "F" if patient_no % 2 else "M"
        ds.BodyPartExamined = "ABDOMEN"
        ds.SliceThickness = f"{dz:g}"
        ds.KVP = f"{profile.kvp:g}"
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = f"{index + 1}"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = (nz - k) if profile.instance_numbers_descending else (k + 1)
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{x0:.4f}", f"{z0 + k * dz:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z0 + k * dz:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = n
        ds.Columns = n
        ds.PixelSpacing = [f"{dxy:g}", f"{dxy:g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16 if profile.signed_pixels else 12
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if profile.signed_pixels else 0
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        datasets.append(ds)
    return datasets


REFERENCE_AUTHOR = SegAuthor(
    model_name="synthetic phantom annotator", software_versions=[__version__], content_label="REFERENCE",
    content_description="Reference annotation (synthetic ground truth)", content_creator_name="Phantom^Annotator",
    series_number=300, series_description="Reference segmentation",
)


def _seg_dataset(
    profile: SiteProfile, seed: int, index: int, ct: list[Dataset], labels: np.ndarray
) -> tuple[hd.seg.Segmentation, list[str]]:
    names = {value: name for name, value in LABELS.items() if value}
    seg, present = build_seg(ct, labels, names, REFERENCE_AUTHOR, _uid("seg-series", profile.name, seed, index),
                             _uid("seg-sop", profile.name, seed, index))
    # Deterministic output: the content timestamps follow the study, not the wall clock.
    seg.SeriesDate = seg.ContentDate = ct[0].StudyDate
    seg.SeriesTime = seg.ContentTime = pydicom.valuerep.TM("100000")
    return seg, present


def generate_study(
    profile: SiteProfile, seed: int, index: int, out: Path, with_annotations: bool
) -> GeneratedStudy:
    phantom = phantom_for(profile, seed, index)
    ct = _ct_datasets(profile, seed, index, phantom)
    folder = Path(out) / profile.name / f"{ct[0].PatientID}_{index:04d}"
    (folder / "ct").mkdir(parents=True, exist_ok=True)
    ct_files = []
    for ds in ct:
        path = folder / "ct" / f"IM{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        ct_files.append(path)
    seg_file = seg_series = None
    present: list[str] = []
    if with_annotations:
        seg, present = _seg_dataset(profile, seed, index, ct, phantom.labels)
        (folder / "seg").mkdir(exist_ok=True)
        seg_file = folder / "seg" / "SEG0001.dcm"
        seg.save_as(seg_file)
        seg_series = str(seg.SeriesInstanceUID)
    return GeneratedStudy(
        site=profile.name,
        index=index,
        patient_id=str(ct[0].PatientID),
        study_uid=str(ct[0].StudyInstanceUID),
        series_uid=str(ct[0].SeriesInstanceUID),
        ct_files=ct_files,
        seg_file=seg_file,
        seg_series_uid=seg_series,
        lesion_count=phantom.lesion_count,
        labels_present=present,
    )


def generate_site(
    site: str | SiteProfile,
    studies: int,
    seed: int,
    out: Path,
    *,
    with_annotations: bool = False,
    slices: int | None = None,
    matrix: int | None = None,
    first_index: int = 0,
) -> list[GeneratedStudy]:
    """Generate `studies` studies of one site under `out/<site>/`. `slices`/`matrix` shrink
    the grid for fast tests; the field of view stays that of the site's scanner."""
    profile = get_profile(site)
    if slices or matrix:
        profile = profile.resized(slices, matrix)
    return [
        generate_study(profile, seed, first_index + i, out, with_annotations)
        for i in range(studies)
    ]


def generate_sites(
    sites: list[str], studies: int, seed: int, out: Path, **kwargs: object
) -> dict[str, list[GeneratedStudy]]:
    return {site: generate_site(site, studies, seed, out, **kwargs) for site in sites}  # type: ignore[arg-type]
