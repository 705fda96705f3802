"""What every DICOMweb resource shares: DICOM JSON (PS3.18 F.2) values by VR, the JSON
response, Accept negotiation, and UID checks on path segments.

Errors are Starlette `HTTPException`s with the standard's status code; Starlette answers them
with the detail as a short text/plain body."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from kaapana_assets.dicom.uids import is_valid_uid

DICOM_JSON = "application/dicom+json"
JSON = "application/json"
DICOM_XML = "application/dicom+xml"

# Value representations whose JSON Value holds numbers (PS3.18 F.2.3); IS and DS are
# strings in the data set and numbers in JSON.
NUMBER_VRS = frozenset({"DS", "FL", "FD", "IS", "SL", "SS", "SV", "UL", "US", "UV"})
INTEGER_VRS = frozenset({"IS", "SL", "SS", "SV", "UL", "US", "UV"})


def tag_hex(tag: int) -> str:
    """The JSON key of an attribute: its tag as eight upper-case hex digits."""
    return f"{tag:08X}"


def keyword_tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"{keyword} is not a DICOM keyword")
    return int(tag)


def element(vr: str, values: Iterable[Any] | None) -> dict[str, Any]:
    """One attribute in DICOM JSON: {"vr": ..., "Value": [...]}; no Value when it is empty.
    PN values are {"Alphabetic": ...}; IS/DS values become JSON numbers."""
    out: dict[str, Any] = {"vr": vr}
    kept = [v for v in (values or ()) if v is not None and v != ""]
    if not kept:
        return out
    if vr == "PN":
        out["Value"] = [person_name(str(v)) for v in kept]
    elif vr in INTEGER_VRS:
        out["Value"] = [int(v) for v in kept]
    elif vr in NUMBER_VRS:
        out["Value"] = [float(v) for v in kept]
    else:
        out["Value"] = [str(v) for v in kept]
    return out


PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def person_name(value: str) -> dict[str, str]:
    """A PN value ("alphabetic=ideographic=phonetic") as its DICOM JSON object."""
    return {group: text for group, text in zip(PN_GROUPS, value.split("="), strict=False) if text}


def keyword_element(keyword: str, value: Any) -> tuple[str, dict[str, Any]]:
    """(tag key, JSON element) of a keyword's value, with the dictionary's VR; a list is a
    multi-valued attribute, None an empty one."""
    tag = keyword_tag(keyword)
    values = value if isinstance(value, (list, tuple)) else (None if value is None else [value])
    return tag_hex(tag), element(dictionary_VR(tag), values)


def dataset_json(ds: Dataset, bulk_data_uri: Any = None) -> dict[str, Any]:
    """A pydicom data set in DICOM JSON; `bulk_data_uri(data_element) -> str` replaces large
    binary values with a BulkDataURI (pydicom's bulk_data_element_handler)."""
    if bulk_data_uri is None:
        return ds.to_json_dict()
    return ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=bulk_data_uri)


class DicomJSONResponse(Response):
    """A list of DICOM JSON objects; `media_type` is what the client's Accept chose
    (application/dicom+json, or application/json for clients that only ask for that)."""

    media_type = DICOM_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header: `type/subtype;param=value;q=...`."""

    media_type: str  # lower-case "type/subtype", possibly with "*"
    params: dict[str, str] = field(default_factory=dict)  # without q
    q: float = 1.0

    def matches(self, media_type: str) -> bool:
        kind, _, sub = media_type.lower().partition("/")
        want_kind, _, want_sub = self.media_type.partition("/")
        return want_kind in ("*", kind) and want_sub in ("*", sub)


def _split_unquoted(text: str, separator: str) -> list[str]:
    """Split on `separator` outside double quotes (type="..." parameter values)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def accepted(request: Request) -> list[MediaRange]:
    """The Accept header's media ranges, best first (q, then specificity); `*/*` when absent."""
    header = request.headers.get("accept", "").strip()
    if not header:
        return [MediaRange("*/*")]
    ranges = []
    for text in (r for r in _split_unquoted(header, ",") if r.strip()):
        media_type, *raw = (p.strip() for p in _split_unquoted(text, ";"))
        params: dict[str, str] = {}
        q = 1.0
        for p in raw:
            name, _, value = p.partition("=")
            name, value = name.strip().lower(), value.strip().strip('"')
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    raise HTTPException(400, f"Accept: bad quality value {value!r}") from None
            elif name:
                params[name] = value
        ranges.append(MediaRange(media_type.lower(), params, q))
    return sorted(ranges, key=lambda r: (-r.q, r.media_type.count("*")))


def negotiate(request: Request, offered: Sequence[str]) -> str:
    """The first of `offered` (in the server's order of preference) that the best acceptable
    media range allows; 406 Not Acceptable when none is."""
    for media_range in accepted(request):
        if media_range.q <= 0:
            continue
        for media_type in offered:
            if media_range.matches(media_type):
                return media_type
    raise HTTPException(406, f"Accept {request.headers.get('accept')!r} allows none of: {', '.join(offered)}")


def require_uid(value: str, what: str) -> str:
    """A UID from the request (a path segment, a query value), or 400 Bad Request."""
    if not is_valid_uid(value):
        raise HTTPException(400, f"{what} {value[:80]!r} is not a valid DICOM UID")
    return value
