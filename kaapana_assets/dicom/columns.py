"""The header columns of `instances`, defined once: each is read from a DICOM attribute
(or a value both parsers derive), decoded as its kind, checked for type and multiplicity,
and stored as its Arrow type. The parser's field list, `InstanceHeader`, validation and
the `instances` schema are all generated from HEADER_COLUMNS."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

ARROW_OF_KIND: dict[str, pa.DataType] = {
    "str": pa.string(),
    "uid": pa.string(),
    "pn": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "floats": pa.list_(pa.float64()),
    "strs": pa.list_(pa.string()),
}
@dataclass(frozen=True)
class HeaderColumn:
    column: str  # the `instances` column and the InstanceHeader field
    source: str  # DICOM keyword read from the data set, or a value both parsers derive (below)
    kind: str  # how the value is decoded: str, uid, pn, int, float, floats, strs
    required: bool = False
    count: int | None = None  # exact multiplicity of a `floats` value

    @property
    def arrow(self) -> pa.DataType:
        return ARROW_OF_KIND[self.kind]


# Values that are not a top-level attribute: both parsers fill them in.
DERIVED_SOURCES = frozenset({"TransferSyntaxUID", "ReferencedSeriesUIDs", "SegmentLabels", "CallingAETitle",
                             "CalledAETitle"})

HEADER_COLUMNS: tuple[HeaderColumn, ...] = (
    HeaderColumn("sop_instance_uid", "SOPInstanceUID", "uid", required=True),
    HeaderColumn("sop_class_uid", "SOPClassUID", "uid", required=True),
    HeaderColumn("series_uid", "SeriesInstanceUID", "uid", required=True),
    HeaderColumn("study_uid", "StudyInstanceUID", "uid", required=True),
    HeaderColumn("patient_id", "PatientID", "str"),
    HeaderColumn("patient_name", "PatientName", "pn"),
    HeaderColumn("patient_sex", "PatientSex", "str"),
    HeaderColumn("patient_birth_date", "PatientBirthDate", "str"),
    HeaderColumn("study_date", "StudyDate", "str"),
    HeaderColumn("study_time", "StudyTime", "str"),
    HeaderColumn("study_id", "StudyID", "str"),
    HeaderColumn("referring_physician_name", "ReferringPhysicianName", "pn"),
    HeaderColumn("study_description", "StudyDescription", "str"),
    HeaderColumn("accession_number", "AccessionNumber", "str"),
    HeaderColumn("institution", "InstitutionName", "str"),
    HeaderColumn("manufacturer", "Manufacturer", "str"),
    HeaderColumn("manufacturer_model", "ManufacturerModelName", "str"),
    HeaderColumn("series_number", "SeriesNumber", "int"),
    HeaderColumn("series_description", "SeriesDescription", "str"),
    HeaderColumn("series_date", "SeriesDate", "str"),
    HeaderColumn("series_time", "SeriesTime", "str"),
    HeaderColumn("body_part", "BodyPartExamined", "str"),
    HeaderColumn("modality", "Modality", "str", required=True),
    HeaderColumn("instance_number", "InstanceNumber", "int"),
    HeaderColumn("image_position", "ImagePositionPatient", "floats", count=3),
    HeaderColumn("image_orientation", "ImageOrientationPatient", "floats", count=6),
    HeaderColumn("pixel_spacing", "PixelSpacing", "floats", count=2),
    HeaderColumn("slice_thickness", "SliceThickness", "float"),
    HeaderColumn("rows", "Rows", "int"),
    HeaderColumn("columns", "Columns", "int"),
    HeaderColumn("bits_allocated", "BitsAllocated", "int"),
    HeaderColumn("number_of_frames", "NumberOfFrames", "int"),
    HeaderColumn("rescale_slope", "RescaleSlope", "float"),
    HeaderColumn("rescale_intercept", "RescaleIntercept", "float"),
    HeaderColumn("frame_of_reference_uid", "FrameOfReferenceUID", "uid"),
    HeaderColumn("transfer_syntax_uid", "TransferSyntaxUID", "uid", required=True),
    HeaderColumn("referenced_series_uids", "ReferencedSeriesUIDs", "strs"),
    HeaderColumn("segment_labels", "SegmentLabels", "strs"),
    HeaderColumn("calling_ae_title", "CallingAETitle", "str"),
    HeaderColumn("called_ae_title", "CalledAETitle", "str"),
)

# Read from the data set for validation only, never stored.
PARSE_ONLY: dict[str, str] = {
    "SpecificCharacterSet": "strs",
    "SamplesPerPixel": "int",
    "BitsStored": "int",
    "PixelData": "pixels",
    "FloatPixelData": "pixels",
    "DoubleFloatPixelData": "pixels",
}

# keyword -> kind, for every attribute the parsers read from the data set itself.
PARSED_FIELDS: dict[str, str] = {
    **{c.source: c.kind for c in HEADER_COLUMNS if c.source not in DERIVED_SOURCES},
    **PARSE_ONLY,
}


def instances_fields() -> list[pa.Field]:
    return [pa.field(c.column, c.arrow) for c in HEADER_COLUMNS]
