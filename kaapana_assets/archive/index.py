"""Series and study rows, recomputed from the instances of the affected studies.

Recomputing from `instances` (rather than incrementing counters) keeps the index right
when a study arrives in several parts, when a SEG arrives after its CT, and after a crash.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from kaapana_assets.lake.digest import row_digest
from kaapana_assets.lake.schemas import INSTANCES, SERIES, STUDIES, TableSpec

AXIAL_TOLERANCE = 0.95  # |slice normal · z| above this counts as axial


def _first(rows: Iterable[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in rows if r.get(key) not in (None, "", [])), None)


def is_axial(orientation: list[float] | None) -> bool | None:
    if not orientation or len(orientation) != 6:
        return None
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    norm = float(np.linalg.norm(normal))
    return bool(norm > 0 and abs(normal[2]) / norm >= AXIAL_TOLERANCE)


MAX_LISTED_GAPS = 1000  # the row lists at most this many missing numbers


def missing_instance_numbers(numbers: list[int]) -> list[int]:
    """Instance numbers missing between the lowest and the highest present, at most
    MAX_LISTED_GAPS of them. Walks the gaps, never the range: an InstanceNumber of
    2147483647 must not allocate two billion integers."""
    present = sorted(set(numbers))
    missing: list[int] = []
    for low, high in zip(present, present[1:], strict=False):
        for n in range(low + 1, min(high, low + 1 + MAX_LISTED_GAPS - len(missing))):
            missing.append(n)
        if len(missing) >= MAX_LISTED_GAPS:
            break
    return missing


# Enhanced and legacy-converted multi-frame image objects: one file, many frames, geometry
# in per-frame functional groups. Volume assembly reads single-frame slices only.
MULTIFRAME_IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET",
}


def multiframe_issue(sop_class_uid: str | None, frames: int | None, modality: str | None) -> str | None:
    """Why an image object with these attributes is not assembled into a volume, or None."""
    if modality == "SEG":
        return None
    name = MULTIFRAME_IMAGE_CLASSES.get(sop_class_uid or "")
    if name is None and (frames or 1) <= 1:
        return None
    return (
        f"{name or 'multi-frame'} image ({frames or 1} frames in one file): volume assembly supports "
        "single-frame slices only; convert it to single frames (e.g. dcmtk's or highdicom's legacy converters)"
    )


# Stamped when the row is written, not computed from the instances.
STAMPS = ("row_digest", "updated_at")
_INSTANCE_COLUMNS = frozenset(INSTANCES.schema.names)


def index_row(table: TableSpec, instances: list[dict[str, Any]], computed: dict[str, Any]) -> dict[str, Any]:
    """A row of `table` (series or studies) with exactly its columns but the stamps, in its
    order: the `computed` values, and for every other column the first value the instances
    carry under that name. The table's schema is the one list of its columns; a computed
    column it lacks, or a column neither computed nor carried by instances, is an error."""
    unknown = computed.keys() - set(table.schema.names)
    uncarried = [n for n in table.schema.names if n not in computed and n not in STAMPS and n not in _INSTANCE_COLUMNS]
    if unknown or uncarried:
        raise ValueError(f"{table.name}: computed columns not in its schema {sorted(unknown)}; "
                         f"schema columns neither computed nor carried by instances {uncarried}")
    return {name: computed[name] if name in computed else _first(instances, name)
            for name in table.schema.names if name not in STAMPS}


def series_rows(instances: list[dict[str, Any]], now: dt.datetime) -> list[dict[str, Any]]:
    by_series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in instances:
        by_series[row["series_uid"]].append(row)
    # Which SEG series point at which series, within the studies at hand.
    segs_of: dict[str, set[str]] = defaultdict(set)
    for series_uid, rows in by_series.items():
        for row in rows:
            for ref in row.get("referenced_series_uids") or []:
                segs_of[ref].add(series_uid)
    out = []
    for series_uid, rows in sorted(by_series.items()):
        rows.sort(key=lambda r: (r.get("instance_number") is None, r.get("instance_number") or 0))
        numbers = [r["instance_number"] for r in rows if r.get("instance_number") is not None]
        gaps = missing_instance_numbers(numbers)
        spacing = _first(rows, "pixel_spacing") or [None, None]
        orientation = _first(rows, "image_orientation")
        row = index_row(SERIES, rows, {
            "series_uid": series_uid,
            "study_uid": rows[0]["study_uid"],
            "instance_count": len(rows),
            "row_spacing": spacing[0] if len(spacing) > 0 else None,
            "column_spacing": spacing[1] if len(spacing) > 1 else None,
            "orientation": orientation,
            "is_axial": is_axial(orientation),
            "min_instance_number": min(numbers) if numbers else None,
            "max_instance_number": max(numbers) if numbers else None,
            "missing_instance_numbers": gaps,
            "complete": not gaps,
            "referenced_series_uids": sorted({u for r in rows for u in r.get("referenced_series_uids") or []}),
            "reference_seg_series_uids": sorted(segs_of.get(series_uid, ())),
            "segment_labels": sorted({lab for r in rows for lab in r.get("segment_labels") or []}),
            "volume_issue": next(
                (issue for r in rows if (issue := multiframe_issue(r.get("sop_class_uid"), r.get("number_of_frames"),
                                                                   r.get("modality")))), None),
        })
        row["row_digest"] = row_digest(row)
        row["updated_at"] = now
        out.append(row)
    return out


def study_rows(instances: list[dict[str, Any]], series: list[dict[str, Any]], now: dt.datetime) -> list[dict[str, Any]]:
    by_study: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in instances:
        by_study[row["study_uid"]].append(row)
    series_count: dict[str, int] = defaultdict(int)
    for s in series:
        series_count[s["study_uid"]] += 1
    out = []
    for study_uid, rows in sorted(by_study.items()):
        row = index_row(STUDIES, rows, {
            "study_uid": study_uid,
            # The acquiring site: prefer the images' institution over a derived object's.
            "institution": _first([r for r in rows if r.get("modality") != "SEG"], "institution")
            or _first(rows, "institution"),
            "modalities": sorted({r["modality"] for r in rows if r.get("modality")}),
            "series_count": series_count[study_uid],
            "instance_count": len(rows),
        })
        row["row_digest"] = row_digest(row)
        row["updated_at"] = now
        out.append(row)
    return out


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_MICROSECOND = dt.timedelta(microseconds=1)
_INT64 = range(-(2**63), 2**63)
TIMESTAMP_UTC = pa.timestamp("us", tz="UTC")


class _NoFastPath(Exception):
    pass


def _json_value(value: Any, kind: pa.DataType) -> Any:
    """`value` as JSON that Arrow reads back to exactly what from_pylist would make of it;
    raises _NoFastPath for anything else (the caller then uses from_pylist itself)."""
    if value is None:
        return None
    if pa.types.is_string(kind):
        if type(value) is str:
            return value
    elif pa.types.is_int64(kind):
        if type(value) is int and value in _INT64:
            return value
    elif pa.types.is_float64(kind):
        if type(value) is float and math.isfinite(value):
            return value
        if type(value) is int and abs(value) <= 2**53:
            return float(value)
    elif pa.types.is_boolean(kind):
        if type(value) is bool:
            return value
    elif pa.types.is_timestamp(kind):
        # Read as int64 microseconds, cast to the timestamp afterwards.
        if isinstance(value, dt.datetime) and value.utcoffset() is not None and kind == TIMESTAMP_UTC:
            return (value - _EPOCH) // _MICROSECOND
    elif pa.types.is_list(kind):
        if type(value) is list:
            return [_json_value(v, kind.value_type) for v in value]
    raise _NoFastPath



def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows as an Arrow table, as `pa.Table.from_pylist(rows, schema=schema)` makes it.

    Through Arrow's JSON reader where every value is plainly of its column's type: the
    first from_pylist (any Python-to-Arrow conversion) in a process imports pandas, ≈0.3 s
    that a cold ingest would otherwise pay; the JSON reader never does. Anything unusual
    (wrong types, NaN, surrogates, unknown keys) goes to from_pylist, whose result or
    error stands; so does everything once pandas is loaded anyway."""
    if not rows:
        return pa.Table.from_batches([], schema=schema)
    if sys.modules.get("pandas") is not None:  # already paid for: from_pylist is the faster way then
        return pa.Table.from_pylist(rows, schema=schema)
    try:
        fields = [(f.name, f.type) for f in schema]
        names = {name for name, _ in fields}
        lines = []
        for row in rows:
            if not names.issuperset(row):
                raise _NoFastPath
            lines.append(json.dumps({name: _json_value(row.get(name), kind) for name, kind in fields},
                                    ensure_ascii=False, allow_nan=False, check_circular=False))
        data = "\n".join(lines).encode("utf-8")  # surrogates (undecodable names) raise here
    except (_NoFastPath, UnicodeEncodeError, ValueError):
        return pa.Table.from_pylist(rows, schema=schema)
    read_schema = pa.schema([pa.field(f.name, pa.int64() if pa.types.is_timestamp(f.type) else f.type) for f in schema])
    try:
        table = pa_json.read_json(
            io.BytesIO(data),
            read_options=pa_json.ReadOptions(block_size=len(data) + 1),  # one block: no line straddles two
            parse_options=pa_json.ParseOptions(explicit_schema=read_schema, unexpected_field_behavior="error"),
        )
        return table.cast(schema)
    except pa.ArrowException:  # not expected after the checks above; from_pylist decides
        return pa.Table.from_pylist(rows, schema=schema)


def series_table(rows: list[dict[str, Any]]) -> pa.Table:
    return to_table(rows, SERIES.schema)


def studies_table(rows: list[dict[str, Any]]) -> pa.Table:
    return to_table(rows, STUDIES.schema)
