"""Read and validate the header of one DICOM file: the row it becomes in `instances`, or
the reason it goes to quarantine. Never raises anything but `Rejected` on bad input."""

from __future__ import annotations

import io
import math
import warnings
import zlib
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from struct import unpack_from
from typing import Any, cast

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import (
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    SegmentationStorage,
)

from kaapana_assets.dicom.columns import DERIVED_SOURCES, HEADER_COLUMNS, PARSED_FIELDS
from kaapana_assets.dicom.uids import is_valid_uid
from kaapana_assets.ingest import elements
from kaapana_assets.ingest.elements import PixelDataInfo

ALL_TRANSFER_SYNTAXES = frozenset(AllTransferSyntaxes)


class Reason(StrEnum):
    """Machine-readable quarantine reasons (the `reason` column of `quarantine`)."""

    NOT_DICOM = "not_dicom"
    NO_FILE_META = "no_file_meta"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    NO_CODEC = "no_codec"  # a known transfer syntax whose pixels no installed decoder reads
    MISSING_TAG = "missing_tag"
    INVALID_UID = "invalid_uid"
    TRUNCATED = "truncated"  # the file really ends early: an element runs past its end
    MALFORMED = "malformed"  # complete, but not well-formed DICOM, or a value of the wrong type
    EXCEEDS_LIMITS = "exceeds_limits"  # more work than one file may cost (items, nesting, inflation)
    SOP_CONFLICT = "sop_conflict"
    SERIES_CONFLICT = "series_conflict"  # a known series UID under another study
    NOT_REGULAR_FILE = "not_regular_file"  # a link, socket, device... in the spool: never followed
    IO_ERROR = "io_error"


# Deflated data sets are inflated at most to this size (a 524 kB bomb inflates to 512 MiB).
# Deflate is used for small non-image objects in practice; 256 MiB is a 512-slice CT volume.
MAX_INFLATED_BYTES = 256 * 2**20


def is_native_failure(exc: BaseException) -> bool:
    """Whether `exc` is a failure on hostile bytes rather than a request to stop: any
    Exception, and the panics of Rust codecs (pyo3's PanicException derives from
    BaseException; the fuzzer found pylibjpeg-rle panicking on a mutated RLE file)."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


class Rejected(Exception):
    def __init__(self, reason: Reason, message: str, study_uid: str | None = None, sop_uid: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.study_uid = study_uid
        self.sop_uid = sop_uid


REQUIRED = tuple(c.source for c in HEADER_COLUMNS if c.required and c.source not in DERIVED_SOURCES)
UID_KEYWORDS = tuple(c.source for c in HEADER_COLUMNS if c.kind == "uid" and c.source not in DERIVED_SOURCES)

# keyword -> how its value is decoded (from the one column table, plus validation-only fields)
FIELDS: dict[str, str] = PARSED_FIELDS


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"{keyword} is not a DICOM keyword")
    return int(tag)


TAGS = {keyword: _tag(keyword) for keyword in FIELDS}
KEYWORD_OF = {tag: keyword for keyword, tag in TAGS.items()}
WANTED = frozenset(TAGS.values())
REFERENCED_SERIES = _tag("ReferencedSeriesSequence")
SEGMENT_SEQUENCE = _tag("SegmentSequence")
SERIES_UID_TAG = TAGS["SeriesInstanceUID"]
SEGMENT_LABEL_TAG = _tag("SegmentLabel")
NESTED = {
    REFERENCED_SERIES: frozenset({SERIES_UID_TAG}),
    SEGMENT_SEQUENCE: frozenset({SEGMENT_LABEL_TAG}),
}
TRANSFER_SYNTAX_TAG = 0x00020010
# Set by the DICOM receiver in the file meta: who sent the instance, and to which AE title.
# (0002,0017) Sending and (0002,0018) Receiving AE Title; files archived before the
# receiver wrote (0002,0017) carry the calling AE title in (0002,0016) Source AE Title.
SOURCE_AE_TAG = 0x00020016
SENDING_AE_TAG = 0x00020017
RECEIVING_AE_TAG = 0x00020018
# The VR of each wanted attribute, for Implicit VR data sets (all unambiguous ones).
DICTIONARY_VR = {tag: dictionary_VR(tag).encode() for tag in WANTED}
# Single-byte or UTF-8 character sets decodable without pydicom's ISO 2022 machinery.
SIMPLE_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}


@dataclass(frozen=True)
class InstanceHeader:
    """One header as validated: a value per `instances` header column (HEADER_COLUMNS), read
    as attributes (`header.study_uid`). Not spelled out field by field: the column table is
    the one definition."""

    values: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        if name == "values":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(f"InstanceHeader has no column {name!r}") from None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)




def _person_name(text: str) -> str | None:
    """Person names compare equal whatever empty trailing components a writer kept."""
    return "=".join(group.rstrip("^ ") for group in text.split("=")).rstrip("=") or None


def _text(raw: bytes, encoding: str) -> str:
    return raw.decode(encoding, errors="replace").strip(" \x00")


_BINARY = {b"US": "H", b"SS": "h", b"UL": "I", b"SL": "i", b"FL": "f", b"FD": "d", b"SV": "q", b"UV": "Q"}


def _convert(kind: str, vr: bytes, raw: object, encoding: str) -> object:
    """One raw value as the walker found it, decoded as its kind. A value of the wrong VR
    decodes to the wrong Python type, which `validate` then rejects as malformed."""
    if kind == "pixels":
        return raw
    assert isinstance(raw, bytes)
    code = _BINARY.get(vr)
    if code is not None:
        width = {"H": 2, "h": 2, "I": 4, "i": 4, "f": 4, "d": 8, "q": 8, "Q": 8}[code]
        count = min(len(raw) // width, 16)  # at most 16 values: no attribute we index has more
        numbers = list(unpack_from(f"<{count}{code}", raw)) if count else []
        if not numbers:
            return None
        if kind == "floats":
            return [float(n) for n in numbers]
        return numbers[0] if kind in ("int", "float") else numbers[0]
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


def _inflate(data: bytes, start: int) -> bytes:
    """The deflated data set after the file meta, inflated (raw deflate, PS3.5 A.5), capped."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data[start:], MAX_INFLATED_BYTES)
    except zlib.error as exc:
        raise Rejected(Reason.MALFORMED, f"deflated data set does not inflate: {exc}") from None
    if inflater.unconsumed_tail:
        raise Rejected(
            Reason.EXCEEDS_LIMITS, f"deflated data set inflates beyond {MAX_INFLATED_BYTES // 2**20} MiB"
        )
    return out


def _raw_text(value: elements.Raw | list[elements.Values] | None, encoding: str) -> str:
    """A raw element's value as text ('' when absent or not a plain value)."""
    return _text(value[1], encoding) if isinstance(value, tuple) and isinstance(value[1], bytes) else ""


def _item_texts(found: elements.Values, sequence: int, tag: int, encoding: str) -> list[str]:
    """The text of `tag` in each item of a nested sequence the walker collected."""
    items = found.get(sequence)
    texts = []
    for item in items if isinstance(items, list) else []:
        value = item.get(tag)
        if isinstance(value, tuple) and isinstance(value[1], bytes):
            texts.append(_raw_text(value, encoding))
    return texts


def _fast_values(data: bytes) -> tuple[dict[str, object], str]:
    """Header values via the element walker (explicit VR little endian only)."""
    meta, pos = elements.read_file_meta(data)
    ts_raw = meta.get(TRANSFER_SYNTAX_TAG)
    if ts_raw is None:  # pydicom's reading decides what such a file is
        raise elements.Unsupported("file meta has no TransferSyntaxUID (0002,0010)")
    transfer_syntax = _raw_text(ts_raw, "ascii")
    if transfer_syntax == ExplicitVRBigEndian or transfer_syntax not in ALL_TRANSFER_SYNTAXES:
        raise elements.Unsupported(transfer_syntax)
    implicit = transfer_syntax == ImplicitVRLittleEndian
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        # Inflated here, capped, so that pydicom never inflates an unbounded stream.
        found, _ = elements.walk(_inflate(data, pos), 0, WANTED, NESTED)
    else:
        found, _ = elements.walk(data, pos, WANTED, NESTED, implicit=implicit)
    ae_titles = {
        keyword: _raw_text(meta[tag], "latin-1") or None
        for keyword, tag in (
            ("CallingAETitle", SOURCE_AE_TAG), ("CallingAETitle", SENDING_AE_TAG), ("CalledAETitle", RECEIVING_AE_TAG)
        )
        if tag in meta
    }
    charset_raw = found.get(TAGS["SpecificCharacterSet"])
    charset = _raw_text(charset_raw, "ascii")
    encoding = SIMPLE_CHARSETS.get(charset)
    if encoding is None:
        raise elements.Unsupported(f"character set {charset}")
    values: dict[str, object] = {}
    for tag, item in found.items():
        if isinstance(item, list):  # a nested sequence's items, read below
            continue
        keyword = KEYWORD_OF[tag]
        vr, raw = item
        if implicit:
            vr = DICTIONARY_VR[tag]
        values[keyword] = _convert(FIELDS[keyword], vr, raw, encoding)
    values["ReferencedSeriesUIDs"] = _item_texts(found, REFERENCED_SERIES, SERIES_UID_TAG, "ascii")
    values["SegmentLabels"] = _item_texts(found, SEGMENT_SEQUENCE, SEGMENT_LABEL_TAG, encoding)
    values.update(ae_titles)
    return values, transfer_syntax


def _pydicom_pixels(ds: pydicom.Dataset, keyword: str) -> PixelDataInfo | None:
    tag = TAGS[keyword]
    if tag not in ds:
        return None
    raw = ds.get_item(tag)  # the raw element keeps its declared length
    value = bytes(raw.value or b"")
    declared = getattr(raw, "length", None)
    undefined = declared == elements.UNDEFINED_LENGTH or getattr(raw, "is_undefined_length", False)
    if undefined:  # encapsulated: fragments after the Basic Offset Table
        fragments = list(pydicom.encaps.generate_fragments(value))
        return PixelDataInfo(sum(len(f) for f in fragments[1:]), len(fragments) - 1)
    if isinstance(declared, int) and declared > len(value):
        # pydicom hands over what the file had: the file ended inside the element.
        raise Rejected(Reason.TRUNCATED, f"{keyword} needs {declared} bytes, the file has {len(value)} left")
    return PixelDataInfo(len(value))


def _pydicom_value(ds: pydicom.Dataset, keyword: str, kind: str) -> object:
    if kind == "pixels":
        return _pydicom_pixels(ds, keyword)
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and kind in ("str", "uid", "pn", "strs"):
        return value  # a text attribute written with a binary VR: rejected by validate
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
            # Pixel Data elements are read raw by tag: ds.get(keyword) would wrap them.
            values = {kw: _pydicom_value(ds, kw, kind) for kw, kind in FIELDS.items() if kind != "pixels"}
            for kw, kind in FIELDS.items():
                if kind == "pixels":
                    values[kw] = _pydicom_pixels(ds, kw)
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
    except BaseException as exc:  # pydicom raises many types on hostile bytes
        if not is_native_failure(exc):
            raise
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
        ("CallingAETitle", "SendingApplicationEntityTitle"),
        ("CalledAETitle", "ReceivingApplicationEntityTitle"),
    ):
        value = str(ds.file_meta.get(meta_keyword, "") or "").strip()
        if value:
            values[keyword] = value
    return values, transfer_syntax


def _expected_pixel_bytes(values: dict[str, object]) -> int | None:
    rows, columns, bits = values.get("Rows"), values.get("Columns"), values.get("BitsAllocated")
    samples, frames = values.get("SamplesPerPixel") or 1, values.get("NumberOfFrames") or 1
    if not all(isinstance(v, int) and v > 0 for v in (rows, columns, bits, samples, frames)):
        return None
    total_bits = rows * columns * samples * frames * bits  # type: ignore[operator]
    return (total_bits + 7) // 8


JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"


@cache
def decoder_missing(transfer_syntax: str, bits_stored: int | None = None) -> str | None:
    """Why pixels in this (encapsulated) transfer syntax cannot be decoded here, or None."""
    import importlib.util

    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import UID

    uid = UID(transfer_syntax)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"pydicom has no decoder for {uid.name} ({uid})"
    if not decoder.is_available:
        return f"no installed codec decodes {uid.name} ({uid})"
    if uid == JPEG_EXTENDED and (bits_stored or 8) > 8 and importlib.util.find_spec("libjpeg") is None:
        # GDCM and Pillow decode 8-bit JPEG Extended only; pylibjpeg-libjpeg is GPL-3.
        return (f"no installed codec decodes {uid.name} ({uid}) at {bits_stored} bits "
                "(GDCM and Pillow read 8 bits; pylibjpeg-libjpeg would, but it is GPL-3 and not installed)")
    return None


def parse_header(data: bytes) -> InstanceHeader:
    """Header of one file's bytes, validated; raises `Rejected` with a reason otherwise."""
    try:
        values, transfer_syntax = _fast_values(data)
    except elements.Truncated as exc:
        raise Rejected(Reason.TRUNCATED, str(exc)) from None
    except elements.TooLarge as exc:
        raise Rejected(Reason.EXCEEDS_LIMITS, str(exc)) from None
    except (elements.Unsupported, elements.Malformed, UnicodeDecodeError, ValueError, OverflowError):
        _bound_for_pydicom(data)
        values, transfer_syntax = _pydicom_values(data)
    return validate(values, transfer_syntax)


# pydicom builds a Dataset per sequence item (~1.3 kB each, measured): a file that claims
# more items than this is refused before pydicom reads it (the walker bounds its own walk).
MAX_PYDICOM_ITEMS = 50_000
_ITEM_TAGS = (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")  # (FFFE,E000) little and big endian


def _bound_for_pydicom(data: bytes) -> None:
    """Refuse what pydicom would read without bound: too many items, or a deflated data set
    that inflates beyond the cap (pydicom inflates the whole stream at once)."""
    if DeflatedExplicitVRLittleEndian.encode() in data[:4096]:
        try:
            _, pos = elements.read_file_meta(data)
        except elements.Malformed as exc:
            raise Rejected(Reason.MALFORMED, f"deflated data set with unreadable file meta: {exc}") from None
        except elements.Unsupported:
            pos = None  # no Part 10 file meta: pydicom cannot know it is deflated
        if pos is not None:
            data = _inflate(data, pos)
    items = max(data.count(tag) for tag in _ITEM_TAGS)
    if items > MAX_PYDICOM_ITEMS:
        raise Rejected(Reason.EXCEEDS_LIMITS, f"about {items:,} sequence items; at most {MAX_PYDICOM_ITEMS:,} are read")


# What each kind must be once decoded: anything else is a value of the wrong VR or
# multiplicity (PatientSex as SS, a position as one integer) and would not fit the schema.
INT64 = 2**63


def _well_typed(kind: str, value: object) -> bool:
    if value is None:
        return True
    if kind in ("str", "uid", "pn"):
        return isinstance(value, str)
    if kind == "strs":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and -INT64 <= value < INT64
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "floats":
        return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return kind == "pixels" and isinstance(value, PixelDataInfo)


def _check_types(values: dict[str, object], hint: dict[str, str | None]) -> None:
    for keyword, kind in FIELDS.items():
        value = values.get(keyword)
        if not _well_typed(kind, value):
            raise Rejected(
                Reason.MALFORMED, f"{keyword} has a value of the wrong type or multiplicity: {str(value)[:80]!r}", **hint
            )
    for keyword in ("ReferencedSeriesUIDs", "SegmentLabels"):
        if not _well_typed("strs", values.get(keyword) or []):
            raise Rejected(Reason.MALFORMED, f"{keyword} is not a list of strings", **hint)
    for column in HEADER_COLUMNS:
        value = values.get(column.source)
        if column.count is not None and isinstance(value, list) and (
                len(value) != column.count or not all(math.isfinite(v) for v in value)):
            raise Rejected(Reason.MALFORMED, f"{column.source} needs {column.count} finite numbers, has {value!r:.80}",
                           **hint)


def validate(values: dict[str, object], transfer_syntax: str) -> InstanceHeader:
    study = values.get("StudyInstanceUID")
    sop = values.get("SOPInstanceUID")
    hint = {"study_uid": study if isinstance(study, str) else None, "sop_uid": sop if isinstance(sop, str) else None}
    if not transfer_syntax:
        raise Rejected(Reason.MISSING_TAG, "file meta has no TransferSyntaxUID (0002,0010)", **hint)
    if transfer_syntax not in ALL_TRANSFER_SYNTAXES:
        raise Rejected(
            Reason.UNSUPPORTED_TRANSFER_SYNTAX, f"transfer syntax {transfer_syntax!r} is not readable", **hint
        )
    _check_types(values, hint)
    missing = [kw for kw in REQUIRED if not values.get(kw)]
    if missing:
        raise Rejected(Reason.MISSING_TAG, f"missing required attribute(s): {', '.join(missing)}", **hint)
    for kw in UID_KEYWORDS:
        value = values.get(kw)
        if value is not None and not is_valid_uid(value):
            raise Rejected(Reason.INVALID_UID, f"{kw} {str(value)[:80]!r} is not a valid DICOM UID", **hint)
    for uid in cast(list[str], values.get("ReferencedSeriesUIDs") or []):  # checked by _check_types
        if not is_valid_uid(uid):
            raise Rejected(Reason.INVALID_UID, f"referenced SeriesInstanceUID {str(uid)[:80]!r} is invalid", **hint)
    pixels = values.get("PixelData")
    if values.get("Rows") and not any(values.get(kw) for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise Rejected(Reason.MISSING_TAG, "image attributes (Rows) without Pixel Data (7FE0,0010/0008/0009)", **hint)
    if isinstance(pixels, PixelDataInfo):
        if pixels.fragments is None:
            expected = _expected_pixel_bytes(values)
            if expected and pixels.length < expected:
                # The walker raises Truncated when a file ends inside the element; a shorter
                # value in a complete file is malformed (pydicom may also hand over a short value).
                raise Rejected(
                    Reason.MALFORMED, f"Pixel Data has {pixels.length} bytes, the image needs {expected}", **hint
                )
        else:
            if pixels.fragments == 0 or pixels.length == 0:
                raise Rejected(Reason.MALFORMED, "encapsulated Pixel Data without any fragment", **hint)
            missing_codec = decoder_missing(transfer_syntax, values.get("BitsStored"))
            if missing_codec:
                raise Rejected(Reason.NO_CODEC, missing_codec, **hint)
    row = {c.column: values.get(c.source) for c in HEADER_COLUMNS}
    row["transfer_syntax_uid"] = transfer_syntax
    row["modality"] = str(row["modality"]).upper()
    for column in HEADER_COLUMNS:
        if column.kind == "strs":
            row[column.column] = list(row[column.column] or [])  # type: ignore[call-overload]
    return InstanceHeader(row)


def is_segmentation(header: InstanceHeader) -> bool:
    return header.sop_class_uid == SegmentationStorage or header.modality == "SEG"
