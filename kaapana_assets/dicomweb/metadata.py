"""WADO-RS metadata: every attribute of an archived instance in DICOM JSON (PS3.18 F.2), large
binary values replaced by a BulkDataURI that `wado.py` serves.

pydicom's `Dataset.to_json_dict` costs ≈2 ms per CT slice (it converts every element and
base64-encodes binary values before deciding they are bulk data); a 300-slice series would
take 0.6 s. Here the raw elements that pydicom's reader leaves unconverted are encoded
directly for the common VRs (text, numbers, binary integers and floats), with pydicom's own
conversion for everything else (sequences, ambiguous VRs of implicit files, other character
sets). Large values are never read: the file is parsed with `defer_size`."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from kaapana_assets.dicomweb.http import tag_hex

# Binary values longer than this become a BulkDataURI; shorter ones are InlineBinary.
BULK_THRESHOLD = 1024
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
PIXEL_DATA = 0x7FE00010
# Text VRs whose value is one string (no backslash splitting), and those split into values.
SINGLE_TEXT = frozenset({"LT", "ST", "UT", "UR"})
MULTI_TEXT = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UC", "UI"})
_BINARY = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
# Character sets whose bytes decode as UTF-8 (ASCII is its subset) or Latin-1 directly.
_UTF8 = {"", "ISO_IR 6", "ISO_IR 192", "ISO 2022 IR 6"}
_LATIN1 = {"ISO_IR 100"}

BulkURI = Callable[[tuple[int, ...]], str]  # the tag path (nested: sequence tag, item index, ...) → URI


def read_header(path: Path) -> Dataset:
    """The instance as pydicom reads it, large values deferred (never read here)."""
    return pydicom.dcmread(path, defer_size=BULK_THRESHOLD)


def _text_codec(ds: Dataset) -> str | None:
    raw = ds.get_item(0x00080005)
    if raw is None:
        return "utf-8"
    value = raw.value if isinstance(raw, RawDataElement) else None
    if isinstance(raw, DataElement):
        values = raw.value if isinstance(raw.value, (list, tuple)) else [raw.value]
        names = [str(v or "").strip() for v in values]
    else:
        names = [v.strip(b" \x00").decode("ascii", "replace") for v in (value or b"").split(b"\\")]
    if all(n in _UTF8 for n in names):
        return "utf-8"
    if all(n in _LATIN1 or n in ("", "ISO_IR 6") for n in names):
        return "latin-1"
    return None  # ISO 2022 escapes and the like: pydicom's conversion


def _number(text: str, vr: str) -> int | float:
    if vr == "IS":
        try:
            return int(text)
        except ValueError:
            return int(float(text))
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _fast(raw: RawDataElement, vr: str, codec: str) -> dict[str, Any] | None:
    """The JSON of a raw element of a plain VR, or None when pydicom should convert it."""
    value: bytes = raw.value or b""
    if vr in _BINARY:
        size = struct.calcsize("<" + _BINARY[vr])
        if len(value) % size:
            return None
        count = len(value) // size
        values = list(struct.unpack(("<" if raw.is_little_endian else ">") + _BINARY[vr] * count, value))
        out: dict[str, Any] = {"vr": vr}
        if values:
            out["Value"] = values
        return out
    if vr in MULTI_TEXT or vr in SINGLE_TEXT or vr in ("PN", "DS", "IS"):
        text = value.decode(codec, "replace")
        parts = [text] if vr in SINGLE_TEXT else text.split("\\")
        if vr == "UI":
            parts = [p.rstrip("\x00 ").lstrip() for p in parts]
        elif vr in SINGLE_TEXT:
            parts = [p.rstrip("\x00 ") for p in parts]
        else:
            parts = [p.strip("\x00 ") for p in parts]
        out = {"vr": vr}
        if not any(parts):
            return out
        if vr == "PN":
            # Alphabetic=Ideographic=Phonetic component groups (PS3.18 F.2.2)
            keyed = []
            for p in parts:
                groups = p.split("=")
                keyed.append({k: g for k, g in zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False)
                              if g} if p else None)
            out["Value"] = keyed
        elif vr in ("DS", "IS"):
            try:
                out["Value"] = [_number(p, vr) if p else None for p in parts]
            except ValueError:
                return None
        else:
            out["Value"] = [p if p else None for p in parts]
        return out
    return None


def _binary(element_vr: str, length: int, value: bytes | None, path: tuple[int, ...], bulk_uri: BulkURI | None
            ) -> dict[str, Any]:
    out: dict[str, Any] = {"vr": element_vr}
    if length == 0 or (value is not None and len(value) == 0):
        return out
    if bulk_uri is not None and (value is None or length > BULK_THRESHOLD or length == 0xFFFFFFFF):
        out["BulkDataURI"] = bulk_uri(path)
    elif value is not None:
        out["InlineBinary"] = base64.b64encode(value).decode("ascii")
    return out


def _pixel_vr(ds: Dataset, raw: RawDataElement) -> str:
    if raw.VR in ("OB", "OW"):
        return str(raw.VR)
    if raw.length == 0xFFFFFFFF:
        return "OB"  # encapsulated
    bits = ds.get("BitsAllocated")
    return "OW" if bits is not None and int(bits) > 8 else "OB"


def dataset_json(ds: Dataset, bulk_uri: BulkURI | None, path: tuple[int, ...] = (), codec: str | None = "") -> dict[str, Any]:
    """Every attribute of `ds` (the file meta group apart) in DICOM JSON. Sequence items
    decode text as the data set that holds them (`codec`)."""
    if codec == "" or "SpecificCharacterSet" in ds:
        codec = _text_codec(ds)
    out: dict[str, Any] = {}
    for tag in list(ds.keys()):
        item = ds.get_item(tag, keep_deferred=True)
        key, here = tag_hex(tag), (*path, int(tag))
        if isinstance(item, RawDataElement):
            vr = item.VR or (dictionary_VR(tag) if Tag(tag).is_private is False and _known(tag) else "UN")
            if int(tag) == PIXEL_DATA:
                out[key] = _binary(_pixel_vr(ds, item), item.length, item.value, here, bulk_uri)
                continue
            if vr in BULK_VRS:
                out[key] = _binary(vr, item.length, item.value, here, bulk_uri)
                continue
            if codec is not None and item.value is not None:
                fast = _fast(item, vr, codec)
                if fast is not None:
                    out[key] = fast
                    continue
        element = ds[tag]  # pydicom's conversion (sequences, ambiguous VRs, other character sets)
        out[key] = _element_json(element, here, bulk_uri, codec)
    return out


def _known(tag: int) -> bool:
    try:
        dictionary_VR(tag)
    except KeyError:
        return False
    return True


def _element_json(element: DataElement, path: tuple[int, ...], bulk_uri: BulkURI | None, codec: str | None
                  ) -> dict[str, Any]:
    vr = str(element.VR)
    if vr == "SQ":
        items = [dataset_json(item, bulk_uri, (*path, index), codec) for index, item in enumerate(element.value)]
        return {"vr": "SQ", **({"Value": items} if items else {})}
    if vr in BULK_VRS or vr in ("OB or OW", "US or OW"):
        value = element.value if element.value is not None else b""
        return _binary(vr if vr in BULK_VRS else "OW", len(value), value, path, bulk_uri)
    return element.to_json_dict(None, BULK_THRESHOLD)
