"""Read and validate the header of one DICOM file: the row it becomes in `instances`, or
the reason it goes to quarantine. Never raises anything but `Rejected` on bad input."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field, fields
from struct import unpack_from

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.uid import (
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    SegmentationStorage,
)

from kaapana_assets.ingest import elements

ALL_TRANSFER_SYNTAXES = frozenset(AllTransferSyntaxes)
from kaapana_assets.ingest.uids import is_valid_uid


class Reason:
    """Machine-readable quarantine reasons."""

    NOT_DICOM = "not_dicom"
    NO_FILE_META = "no_file_meta"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    MISSING_TAG = "missing_tag"
    INVALID_UID = "invalid_uid"
    TRUNCATED = "truncated"
    MALFORMED = "malformed"
    SOP_CONFLICT = "sop_conflict"
    IO_ERROR = "io_error"


class Rejected(Exception):
    def __init__(self, reason: str, message: str, study_uid: str | None = None, sop_uid: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.study_uid = study_uid
        self.sop_uid = sop_uid


REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")
UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

# keyword -> how its value is decoded
FIELDS: dict[str, str] = {
    "SpecificCharacterSet": "strs",
    "SOPClassUID": "uid",
    "SOPInstanceUID": "uid",
    "StudyDate": "str",
    "AccessionNumber": "str",
    "Modality": "str",
    "Manufacturer": "str",
    "InstitutionName": "str",
    "StudyDescription": "str",
    "SeriesDescription": "str",
    "ManufacturerModelName": "str",
    "PatientName": "pn",
    "PatientID": "str",
    "PatientBirthDate": "str",
    "PatientSex": "str",
    "BodyPartExamined": "str",
    "SliceThickness": "float",
    "StudyInstanceUID": "uid",
    "SeriesInstanceUID": "uid",
    "SeriesNumber": "int",
    "InstanceNumber": "int",
    "ImagePositionPatient": "floats",
    "ImageOrientationPatient": "floats",
    "FrameOfReferenceUID": "uid",
    "SamplesPerPixel": "int",
    "NumberOfFrames": "int",
    "Rows": "int",
    "Columns": "int",
    "PixelSpacing": "floats",
    "BitsAllocated": "int",
    "RescaleIntercept": "float",
    "RescaleSlope": "float",
    "PixelData": "bytes",
}
TAGS = {keyword: int(tag_for_keyword(keyword)) for keyword in FIELDS}  # type: ignore[arg-type]
KEYWORD_OF = {tag: keyword for keyword, tag in TAGS.items()}
WANTED = frozenset(TAGS.values())
REFERENCED_SERIES = int(tag_for_keyword("ReferencedSeriesSequence"))  # type: ignore[arg-type]
SEGMENT_SEQUENCE = int(tag_for_keyword("SegmentSequence"))  # type: ignore[arg-type]
SERIES_UID_TAG = TAGS["SeriesInstanceUID"]
SEGMENT_LABEL_TAG = int(tag_for_keyword("SegmentLabel"))  # type: ignore[arg-type]
NESTED = {
    REFERENCED_SERIES: frozenset({SERIES_UID_TAG}),
    SEGMENT_SEQUENCE: frozenset({SEGMENT_LABEL_TAG}),
}
TRANSFER_SYNTAX_TAG = 0x00020010
# Set by the DICOM receiver in the file meta: who sent the instance, and to which AE title.
SOURCE_AE_TAG = 0x00020016
RECEIVING_AE_TAG = 0x00020018
# Data sets in these transfer syntaxes are explicit VR little endian (encapsulated pixel
# data included); the others go through pydicom.
NOT_EXPLICIT_LE = {ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
NATIVE = {ImplicitVRLittleEndian, "1.2.840.10008.1.2.1", ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
# Single-byte or UTF-8 character sets decodable without pydicom's ISO 2022 machinery.
SIMPLE_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}


@dataclass
class InstanceHeader:
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    modality: str
    transfer_syntax_uid: str
    patient_id: str | None = None
    patient_name: str | None = None
    patient_sex: str | None = None
    patient_birth_date: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    accession_number: str | None = None
    institution: str | None = None
    manufacturer: str | None = None
    manufacturer_model: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part: str | None = None
    instance_number: int | None = None
    image_position: list[float] | None = None
    image_orientation: list[float] | None = None
    pixel_spacing: list[float] | None = None
    slice_thickness: float | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int | None = None
    rescale_slope: float | None = None
    rescale_intercept: float | None = None
    frame_of_reference_uid: str | None = None
    referenced_series_uids: list[str] = field(default_factory=list)
    segment_labels: list[str] = field(default_factory=list)
    calling_ae_title: str | None = None
    called_ae_title: str | None = None

    def as_dict(self) -> dict[str, object]:
        # Shallow on purpose: dataclasses.asdict deep-copies and cost ~0.4 ms per file.
        return {name: getattr(self, name) for name in _HEADER_FIELDS}


_HEADER_FIELDS = tuple(f.name for f in fields(InstanceHeader))


def _person_name(text: str) -> str | None:
    """Person names compare equal whatever empty trailing components a writer kept."""
    return "=".join(group.rstrip("^ ") for group in text.split("=")).rstrip("=") or None


def _text(raw: bytes, encoding: str) -> str:
    return raw.decode(encoding, errors="replace").strip(" \x00")


def _convert(kind: str, vr: bytes, raw: bytes, encoding: str) -> object:
    if kind == "bytes":
        return raw
    if vr in (b"US", b"SS", b"UL", b"SL"):
        fmt = {b"US": "<H", b"SS": "<h", b"UL": "<I", b"SL": "<i"}[vr]
        if len(raw) < {b"US": 2, b"SS": 2, b"UL": 4, b"SL": 4}[vr]:
            return None
        return int(unpack_from(fmt, raw)[0])
    text = _text(raw, encoding)
    if kind in ("str", "uid"):
        return text or None
    if kind == "pn":
        return _person_name(text)
    parts = [p.strip() for p in text.split("\\")]
    if kind == "strs":
        return [p for p in parts if p]
    if not text:
        return None
    if kind == "int":
        return int(float(parts[0]))
    if kind == "float":
        return float(parts[0])
    return [float(p) for p in parts]  # floats


def _fast_values(data: bytes) -> tuple[dict[str, object], str]:
    """Header values via the element walker (explicit VR little endian only)."""
    meta, pos = elements.read_file_meta(data)
    ts_raw = meta.get(TRANSFER_SYNTAX_TAG)
    if ts_raw is None:
        raise Rejected(Reason.MISSING_TAG, "file meta has no TransferSyntaxUID (0002,0010)")
    transfer_syntax = _text(ts_raw[1], "ascii")  # type: ignore[index]
    if transfer_syntax in NOT_EXPLICIT_LE or transfer_syntax not in ALL_TRANSFER_SYNTAXES:
        raise elements.Unsupported(transfer_syntax)
    found, _ = elements.walk(data, pos, WANTED, NESTED)
    ae_titles = {
        keyword: _text(meta[tag][1], "latin-1") or None  # type: ignore[index]
        for keyword, tag in (("CallingAETitle", SOURCE_AE_TAG), ("CalledAETitle", RECEIVING_AE_TAG))
        if tag in meta
    }
    charset_raw = found.get(TAGS["SpecificCharacterSet"])
    charset = _text(charset_raw[1], "ascii") if charset_raw else ""  # type: ignore[index]
    encoding = SIMPLE_CHARSETS.get(charset)
    if encoding is None:
        raise elements.Unsupported(f"character set {charset}")
    values: dict[str, object] = {}
    for tag, item in found.items():
        if tag in NESTED:
            continue
        keyword = KEYWORD_OF[tag]
        vr, raw = item  # type: ignore[misc]
        values[keyword] = _convert(FIELDS[keyword], vr, raw, encoding)
    values["ReferencedSeriesUIDs"] = [
        _text(item[SERIES_UID_TAG][1], "ascii")  # type: ignore[index]
        for item in found.get(REFERENCED_SERIES, [])  # type: ignore[union-attr]
        if SERIES_UID_TAG in item
    ]
    values["SegmentLabels"] = [
        _text(item[SEGMENT_LABEL_TAG][1], encoding)  # type: ignore[index]
        for item in found.get(SEGMENT_SEQUENCE, [])  # type: ignore[union-attr]
        if SEGMENT_LABEL_TAG in item
    ]
    values.update(ae_titles)
    return values, transfer_syntax


def _pydicom_value(ds: pydicom.Dataset, keyword: str, kind: str) -> object:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if kind == "bytes":
        return bytes(value)
    if kind in ("str", "uid"):
        return str(value).strip(" \x00") or None
    if kind == "pn":
        return _person_name(str(value).strip(" \x00"))
    if kind == "strs":
        return [str(v) for v in (value if isinstance(value, pydicom.multival.MultiValue) else [value]) if str(v)]
    if kind == "int":
        return int(float(value))
    if kind == "float":
        return float(value)
    return [float(v) for v in (value if isinstance(value, (list, pydicom.multival.MultiValue)) else [value])]


def _pydicom_values(data: bytes) -> tuple[dict[str, object], str]:
    """Header values via pydicom: the reference path for everything the walker declines."""
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
            values = {kw: _pydicom_value(ds, kw, kind) for kw, kind in FIELDS.items()}
            values["ReferencedSeriesUIDs"] = [
                str(item.SeriesInstanceUID)
                for item in ds.get("ReferencedSeriesSequence", [])
                if "SeriesInstanceUID" in item
            ]
            values["SegmentLabels"] = [
                str(item.SegmentLabel) for item in ds.get("SegmentSequence", []) if "SegmentLabel" in item
            ]
    except Rejected:
        raise
    except EOFError as exc:
        raise Rejected(Reason.TRUNCATED, f"unexpected end of file: {exc}") from None
    except Exception as exc:  # pydicom raises many types on hostile bytes
        reason = Reason.NOT_DICOM if not has_preamble else Reason.MALFORMED
        raise Rejected(reason, f"{type(exc).__name__}: {exc}"[:500]) from None
    if not has_preamble:
        sop = values.get("SOPInstanceUID")
        if sop:
            raise Rejected(
                Reason.NO_FILE_META,
                "data set without DICOM Part 10 preamble/file meta; re-send it as a Part 10 file",
                study_uid=values.get("StudyInstanceUID"),  # type: ignore[arg-type]
                sop_uid=str(sop),
            )
        raise Rejected(Reason.NOT_DICOM, "no DICOM preamble and no SOP Instance UID")
    transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    for keyword, meta_keyword in (
        ("CallingAETitle", "SourceApplicationEntityTitle"),
        ("CalledAETitle", "ReceivingApplicationEntityTitle"),
    ):
        value = str(ds.file_meta.get(meta_keyword, "") or "").strip()
        if value:
            values[keyword] = value
    return values, transfer_syntax


def _expected_pixel_bytes(values: dict[str, object]) -> int | None:
    rows, columns, bits = values.get("Rows"), values.get("Columns"), values.get("BitsAllocated")
    if not (isinstance(rows, int) and isinstance(columns, int) and isinstance(bits, int)):
        return None
    samples = values.get("SamplesPerPixel") or 1
    frames = values.get("NumberOfFrames") or 1
    total_bits = rows * columns * int(samples) * int(frames) * bits  # type: ignore[call-overload]
    return (total_bits + 7) // 8


def parse_header(data: bytes) -> InstanceHeader:
    """Header of one file's bytes, validated; raises `Rejected` with a reason otherwise."""
    try:
        values, transfer_syntax = _fast_values(data)
    except elements.Truncated as exc:
        raise Rejected(Reason.TRUNCATED, str(exc)) from None
    except (elements.Unsupported, elements.Malformed, UnicodeDecodeError, ValueError, OverflowError):
        values, transfer_syntax = _pydicom_values(data)
    return validate(values, transfer_syntax)


def validate(values: dict[str, object], transfer_syntax: str) -> InstanceHeader:
    study = values.get("StudyInstanceUID")
    sop = values.get("SOPInstanceUID")
    hint = {"study_uid": study if isinstance(study, str) else None, "sop_uid": sop if isinstance(sop, str) else None}
    if not transfer_syntax or transfer_syntax not in ALL_TRANSFER_SYNTAXES:
        raise Rejected(
            Reason.UNSUPPORTED_TRANSFER_SYNTAX, f"transfer syntax {transfer_syntax!r} is not readable", **hint
        )
    missing = [kw for kw in REQUIRED if not values.get(kw)]
    if missing:
        raise Rejected(Reason.MISSING_TAG, f"missing required attribute(s): {', '.join(missing)}", **hint)
    for kw in (*UID_KEYWORDS, "FrameOfReferenceUID"):
        value = values.get(kw)
        if value is not None and not is_valid_uid(value):
            raise Rejected(Reason.INVALID_UID, f"{kw} {str(value)[:80]!r} is not a valid DICOM UID", **hint)
    for uid in values.get("ReferencedSeriesUIDs") or []:  # type: ignore[union-attr]
        if not is_valid_uid(uid):
            raise Rejected(Reason.INVALID_UID, f"referenced SeriesInstanceUID {str(uid)[:80]!r} is invalid", **hint)
    pixels = values.get("PixelData")
    if values.get("Rows") and pixels is None:
        raise Rejected(Reason.TRUNCATED, "image without Pixel Data (7FE0,0010)", **hint)
    expected = _expected_pixel_bytes(values)
    if isinstance(pixels, bytes) and expected and transfer_syntax in NATIVE and len(pixels) < expected:
        raise Rejected(
            Reason.TRUNCATED, f"Pixel Data has {len(pixels)} bytes, the image needs {expected}", **hint
        )
    return InstanceHeader(
        sop_instance_uid=str(values["SOPInstanceUID"]),
        sop_class_uid=str(values["SOPClassUID"]),
        series_uid=str(values["SeriesInstanceUID"]),
        study_uid=str(values["StudyInstanceUID"]),
        modality=str(values["Modality"]).upper(),
        transfer_syntax_uid=transfer_syntax,
        patient_id=values.get("PatientID"),  # type: ignore[arg-type]
        patient_name=values.get("PatientName"),  # type: ignore[arg-type]
        patient_sex=values.get("PatientSex"),  # type: ignore[arg-type]
        patient_birth_date=values.get("PatientBirthDate"),  # type: ignore[arg-type]
        study_date=values.get("StudyDate"),  # type: ignore[arg-type]
        study_description=values.get("StudyDescription"),  # type: ignore[arg-type]
        accession_number=values.get("AccessionNumber"),  # type: ignore[arg-type]
        institution=values.get("InstitutionName"),  # type: ignore[arg-type]
        manufacturer=values.get("Manufacturer"),  # type: ignore[arg-type]
        manufacturer_model=values.get("ManufacturerModelName"),  # type: ignore[arg-type]
        series_number=values.get("SeriesNumber"),  # type: ignore[arg-type]
        series_description=values.get("SeriesDescription"),  # type: ignore[arg-type]
        body_part=values.get("BodyPartExamined"),  # type: ignore[arg-type]
        instance_number=values.get("InstanceNumber"),  # type: ignore[arg-type]
        image_position=values.get("ImagePositionPatient"),  # type: ignore[arg-type]
        image_orientation=values.get("ImageOrientationPatient"),  # type: ignore[arg-type]
        pixel_spacing=values.get("PixelSpacing"),  # type: ignore[arg-type]
        slice_thickness=values.get("SliceThickness"),  # type: ignore[arg-type]
        rows=values.get("Rows"),  # type: ignore[arg-type]
        columns=values.get("Columns"),  # type: ignore[arg-type]
        number_of_frames=values.get("NumberOfFrames"),  # type: ignore[arg-type]
        rescale_slope=values.get("RescaleSlope"),  # type: ignore[arg-type]
        rescale_intercept=values.get("RescaleIntercept"),  # type: ignore[arg-type]
        frame_of_reference_uid=values.get("FrameOfReferenceUID"),  # type: ignore[arg-type]
        referenced_series_uids=list(values.get("ReferencedSeriesUIDs") or []),  # type: ignore[call-overload]
        segment_labels=list(values.get("SegmentLabels") or []),  # type: ignore[call-overload]
        calling_ae_title=values.get("CallingAETitle"),  # type: ignore[arg-type]
        called_ae_title=values.get("CalledAETitle"),  # type: ignore[arg-type]
    )


def is_segmentation(header: InstanceHeader) -> bool:
    return header.sop_class_uid == SegmentationStorage or header.modality == "SEG"
