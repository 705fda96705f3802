"""QIDO-RS searches answered from the Delta index (`studies`, `series`, `instances`), never
from the files: which attributes each level answers, how a query string becomes a polars
filter, and the page of results as DICOM JSON.

Each level's frame (series joined with their study, instances with their series and study)
is read once per Delta version of the tables behind it and kept; a request checks the
versions (one incremental log read per table), filters the frame in polars, and builds JSON
only for the page it returns."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

import polars as pl
import pyarrow as pa
from deltalake import DeltaTable
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from kaapana_assets.dicom.uids import is_valid_uid
from kaapana_assets.dicomweb.config import DICOMWEB_ROOT
from kaapana_assets.dicomweb.http import PN_GROUPS, tag_hex
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES, SERIES, STUDIES, TableSpec
from kaapana_assets.projects.membership import ProjectScope, everything


class Level(StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


DEPTH = {Level.STUDY: 0, Level.SERIES: 1, Level.INSTANCE: 2}


class QueryError(ValueError):
    """A malformed query: answered 400 Bad Request with this message."""


class NotFound(LookupError):
    """A study or series named in the path that the index does not hold: 404."""


@dataclass(frozen=True)
class Attribute:
    keyword: str
    column: str  # in the level's frame
    level: Level
    default: bool = True  # returned without includefield (PS3.18 Table 6.7.1-2, as Orthanc answers)
    # Returned in the answers of lower levels too: a series' answer carries its study's
    # attributes (Orthanc does so for every series and instance search); counts do not.
    inherited: bool = True
    # Left out when the index holds no value (Orthanc leaves out an instance's absent Rows or
    # NumberOfFrames), rather than returned empty (a study's type-2 ReferringPhysicianName).
    omit_empty: bool = False

    @cached_property
    def tag(self) -> int:
        tag = tag_for_keyword(self.keyword)
        assert tag is not None, self.keyword
        return int(tag)

    @cached_property
    def vr(self) -> str:
        return str(dictionary_VR(self.tag))

    @cached_property
    def key(self) -> str:
        return tag_hex(self.tag)


S, R, I = Level.STUDY, Level.SERIES, Level.INSTANCE
ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("StudyDate", "study_date", S),
    Attribute("StudyTime", "study_time", S),
    Attribute("AccessionNumber", "accession_number", S),
    Attribute("ModalitiesInStudy", "modalities", S, inherited=False),
    Attribute("ReferringPhysicianName", "referring_physician_name", S),
    Attribute("StudyDescription", "study_description", S, default=False),
    Attribute("PatientName", "patient_name", S),
    Attribute("PatientID", "patient_id", S),
    Attribute("PatientBirthDate", "patient_birth_date", S),
    Attribute("PatientSex", "patient_sex", S),
    Attribute("StudyInstanceUID", "study_uid", S),
    Attribute("StudyID", "study_id", S),
    Attribute("NumberOfStudyRelatedSeries", "study_series_count", S, inherited=False),
    Attribute("NumberOfStudyRelatedInstances", "study_instance_count", S, inherited=False),
    Attribute("Modality", "modality", R),
    Attribute("SeriesDescription", "series_description", R),
    Attribute("SeriesNumber", "series_number", R),
    Attribute("SeriesInstanceUID", "series_uid", R),
    Attribute("NumberOfSeriesRelatedInstances", "series_instance_count", R, inherited=False),
    Attribute("SeriesDate", "series_date", R, default=False),
    Attribute("SeriesTime", "series_time", R, default=False),
    Attribute("BodyPartExamined", "body_part", R, default=False),
    Attribute("Manufacturer", "manufacturer", R, default=False),
    Attribute("ManufacturerModelName", "manufacturer_model", R, default=False),
    Attribute("InstitutionName", "institution", R, default=False),
    Attribute("FrameOfReferenceUID", "frame_of_reference_uid", R, default=False),
    Attribute("SOPClassUID", "sop_class_uid", I),
    Attribute("SOPInstanceUID", "sop_instance_uid", I),
    Attribute("InstanceNumber", "instance_number", I, omit_empty=True),
    Attribute("Rows", "rows", I, omit_empty=True),
    Attribute("Columns", "columns", I, omit_empty=True),
    Attribute("BitsAllocated", "bits_allocated", I, omit_empty=True),
    Attribute("NumberOfFrames", "number_of_frames", I, omit_empty=True),
    Attribute("SliceThickness", "slice_thickness", I, default=False, omit_empty=True),
    Attribute("ImagePositionPatient", "image_position", I, default=False, omit_empty=True),
    Attribute("ImageOrientationPatient", "image_orientation", I, default=False, omit_empty=True),
    Attribute("PixelSpacing", "pixel_spacing", I, default=False, omit_empty=True),
    Attribute("RescaleIntercept", "rescale_intercept", I, default=False, omit_empty=True),
    Attribute("RescaleSlope", "rescale_slope", I, default=False, omit_empty=True),
)
BY_KEYWORD = {a.keyword: a for a in ATTRIBUTES}
RETRIEVE_URL_KEY = tag_hex(0x00081190)
RESERVED = frozenset({"limit", "offset", "includefield", "fuzzymatching"})


def available(level: Level) -> tuple[Attribute, ...]:
    """What a search at `level` matches on and can return: its own and its parents' attributes."""
    return tuple(a for a in ATTRIBUTES if DEPTH[a.level] <= DEPTH[level])


def defaults(level: Level) -> frozenset[Attribute]:
    return frozenset(a for a in available(level) if a.default and (a.level == level or a.inherited))


# Query values -------------------------------------------------------------------------

DATE = re.compile(r"\d{8}")
TIME = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
RANGE_VRS = {"DA": DATE, "TM": TIME}
NUMBER_VRS = frozenset({"IS", "US", "UL", "SS", "SL"})
FLOAT_VRS = frozenset({"DS", "FL", "FD"})


def resolve(name: str, level: Level) -> Attribute:
    """A query key (keyword or eight hex digits) as one of `level`'s attributes, or QueryError."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        keyword = keyword_for_tag(int(name, 16))
        if not keyword:
            raise QueryError(f"{name} is not a tag of the DICOM data dictionary")
    elif tag_for_keyword(name) is not None:
        keyword = name
    else:
        raise QueryError(f"{name!r} is neither a DICOM keyword nor a tag (eight hex digits); "
                         "sequence paths are not supported")
    attribute = BY_KEYWORD.get(keyword)
    if attribute is None or attribute not in available(level):
        known = ", ".join(a.keyword for a in available(level))
        raise QueryError(f"{keyword} is not searchable at the {level} level (the index holds: {known})")
    return attribute


def _wildcard(value: str, case_insensitive: bool) -> str:
    pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value)
    return ("(?is)" if case_insensitive else "(?s)") + f"^{pattern}$"


def match_expression(attribute: Attribute, value: str) -> pl.Expr:
    """The filter for `attribute=value` (PS3.4 C.2.2.2): UID list, range (DA/TM), wildcard
    (* and ?), or single value. Person names match case-insensitively, as Orthanc does."""
    col = pl.col(attribute.column)
    vr = attribute.vr
    if vr == "UI":
        uids = [u.strip() for u in value.split(",")]
        bad = [u for u in uids if not is_valid_uid(u)]
        if bad:
            raise QueryError(f"{attribute.keyword}: {bad[0][:80]!r} is not a valid UID")
        return col.is_in(uids)
    if vr in RANGE_VRS:
        form = RANGE_VRS[vr]
        low, dash, high = value.partition("-")
        for part in (low, high):
            if part and not form.fullmatch(part):
                raise QueryError(f"{attribute.keyword}: {value!r} is not a {vr} value or range "
                                 f"({'YYYYMMDD' if vr == 'DA' else 'HHMMSS.FFFFFF'}, A-B, A- or -B)")
        if not dash:
            return col == low
        if not low and not high:
            raise QueryError(f"{attribute.keyword}: a range needs at least one bound")
        expr = pl.lit(True)
        if low:
            expr = expr & (col >= low)
        if high:
            # "1000" bounds every time that starts with 10:00 (100000.5 included)
            expr = expr & (col <= high + "\uffff")
        return expr
    if vr in NUMBER_VRS or vr in FLOAT_VRS:
        try:
            number: float = int(value) if vr in NUMBER_VRS else float(value)
        except ValueError:
            raise QueryError(f"{attribute.keyword}: {value!r} is not a number") from None
        return col == number
    case_insensitive = vr == "PN"
    is_list = attribute.column == "modalities"
    if "*" in value or "?" in value:
        pattern = _wildcard(value, case_insensitive)
        if is_list:
            return col.list.eval(pl.element().str.contains(pattern)).list.any()
        return col.str.contains(pattern)
    if is_list:
        return col.list.contains(value)
    if case_insensitive:
        return col.str.to_lowercase() == value.lower()
    return col == value


@dataclass(frozen=True)
class Query:
    """A parsed QIDO-RS query string."""

    filters: tuple[tuple[Attribute, str], ...] = ()
    returned: frozenset[Attribute] = frozenset()  # beyond the level's defaults
    limit: int | None = None
    offset: int = 0
    ignored_fields: tuple[str, ...] = ()  # includefield keywords the index does not hold


def _count(name: str, value: str) -> int:
    if not re.fullmatch(r"\d{1,9}", value):
        raise QueryError(f"{name} must be a non-negative integer, not {value[:40]!r}")
    return int(value)


def parse_query(items: Iterable[tuple[str, str]], level: Level) -> Query:
    filters: list[tuple[Attribute, str]] = []
    returned: set[Attribute] = set()
    ignored: list[str] = []
    limit: int | None = None
    offset = 0
    for name, value in items:
        if name == "limit":
            limit = _count(name, value)
        elif name == "offset":
            offset = _count(name, value)
        elif name == "fuzzymatching":
            if value.lower() == "true":
                raise QueryError("fuzzymatching is not supported: attributes match exactly, by wildcard or range")
            if value.lower() != "false":
                raise QueryError(f"fuzzymatching must be true or false, not {value[:40]!r}")
        elif name == "includefield":
            for field_name in (f.strip() for f in value.split(",")):
                if field_name == "all":
                    returned.update(available(level))
                elif field_name:
                    try:
                        returned.add(resolve(field_name, level))
                    except QueryError:
                        # A dictionary attribute the index does not hold at this level is left
                        # out (PS3.18 lets a server return fewer); anything else is malformed.
                        if not _is_dictionary_attribute(field_name):
                            raise
                        ignored.append(field_name)
        else:
            attribute = resolve(name, level)
            returned.add(attribute)  # matching keys are returned (PS3.18 8.3.4.1)
            if value != "":  # empty: universal matching
                filters.append((attribute, value))
    return Query(tuple(filters), frozenset(returned), limit, offset, tuple(ignored))


def _is_dictionary_attribute(name: str) -> bool:
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return bool(keyword_for_tag(int(name, 16)))
    return tag_for_keyword(name) is not None


# The index, cached per Delta version ---------------------------------------------------

@dataclass
class _VersionedTable:
    spec: TableSpec
    handle: DeltaTable | None = None

    def version(self, lake: Lake) -> int | None:
        """The table's current version: an incremental read of the log's new entries."""
        if self.handle is None:
            if not lake.exists(self.spec):
                return None
            self.handle = DeltaTable(lake.uri(self.spec), storage_options=lake.storage_options)
        else:
            self.handle.update_incremental()
        return self.handle.version()


def _read(lake: Lake, spec: TableSpec, version: int | None, columns: Mapping[str, str]) -> pl.DataFrame:
    """`columns` (table column → frame column) of one version; columns an older table lacks
    read as null (they are filled on its next MERGE)."""
    frame = lake.scan(spec, version=version).collect()
    types = dict(pl.from_arrow(pa.Table.from_batches([], schema=spec.schema)).schema)  # type: ignore[union-attr]
    return frame.select([
        (pl.col(name) if name in frame.columns else pl.lit(None, dtype=types[name])).alias(alias)
        for name, alias in columns.items()
    ])


def _columns(level: Level, *, rename: Mapping[str, str] = {}) -> dict[str, str]:  # noqa: B006 (read only)
    return {rename.get(a.column, a.column): a.column for a in ATTRIBUTES if a.level == level}


STUDY_COLUMNS = _columns(S, rename={"study_series_count": "series_count", "study_instance_count": "instance_count"})
SERIES_COLUMNS = {**_columns(R, rename={"series_instance_count": "instance_count"}), "study_uid": "study_uid"}
INSTANCE_COLUMNS = {**_columns(I), "series_uid": "series_uid"}


@dataclass
class Index:
    """The three levels' frames, each rebuilt when a table behind it has a new version."""

    lake: Lake
    _tables: dict[str, _VersionedTable] = field(default_factory=dict)
    _frames: dict[Level, tuple[tuple[int | None, ...], pl.DataFrame]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    TABLES_OF = {S: (STUDIES,), R: (STUDIES, SERIES), I: (STUDIES, SERIES, INSTANCES)}

    def frame(self, level: Level) -> pl.DataFrame:
        with self._lock:
            versions = tuple(self._table(spec).version(self.lake) for spec in self.TABLES_OF[level])
            cached = self._frames.get(level)
            if cached is not None and cached[0] == versions:
                return cached[1]
            frame = self._build(level, dict(zip((s.name for s in self.TABLES_OF[level]), versions, strict=True)))
            self._frames[level] = (versions, frame)
            return frame

    def _table(self, spec: TableSpec) -> _VersionedTable:
        return self._tables.setdefault(spec.name, _VersionedTable(spec))

    def _build(self, level: Level, versions: dict[str, int | None]) -> pl.DataFrame:
        studies = _read(self.lake, STUDIES, versions[STUDIES.name], STUDY_COLUMNS)
        if level == S:
            return studies.sort("study_uid")
        series = _read(self.lake, SERIES, versions[SERIES.name], SERIES_COLUMNS).join(
            studies, on="study_uid", how="inner")
        if level == R:
            return series.sort("study_uid", "series_uid")
        instances = _read(self.lake, INSTANCES, versions[INSTANCES.name], INSTANCE_COLUMNS).join(
            series, on="series_uid", how="inner")
        return instances.sort("study_uid", "series_uid", "instance_number", "sop_instance_uid", nulls_last=True)


# Searching ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scope:
    """The part of the hierarchy a search is under: /studies/{study}/series/{series}/..."""

    study_uid: str | None = None
    series_uid: str | None = None


STUDY_AGGREGATES = ("modalities", "study_series_count", "study_instance_count")


def _allowed(index: Index, level: Level, allowed: ProjectScope) -> pl.DataFrame:
    """The rows of `level` the reader's projects hold: studies with a series of theirs, their series
    and those series' instances. A study's counts and modalities are over those series alone: a
    study shared with another project neither lists nor counts (nor matches on) what that
    project's series add."""
    frame = index.frame(level)
    if allowed.everything:
        return frame
    if level is not S:
        return frame.filter(pl.col("series_uid").is_in(sorted(allowed.series_uids)))
    studies = frame.filter(pl.col("study_uid").is_in(sorted(allowed.study_uids)))
    series = index.frame(R).filter(pl.col("series_uid").is_in(sorted(allowed.series_uids)))
    aggregates = series.group_by("study_uid").agg(
        pl.col("modality").drop_nulls().unique().sort().alias("modalities"),
        pl.len().alias("study_series_count"),
        pl.col("series_instance_count").sum().alias("study_instance_count"),
    )
    return studies.drop(STUDY_AGGREGATES).join(aggregates, on="study_uid", how="left").select(
        [pl.col(name).cast(dtype) for name, dtype in studies.schema.items()])


def search(index: Index, level: Level, query: Query, scope: Scope, base_url: str,
           allowed: ProjectScope | None = None) -> bytes:
    """The page of `level` objects matching `query` under `scope`: a DICOM JSON array. With
    `allowed`, only what the reader's projects hold; anything else is as absent (404 or none)."""
    allowed = everything() if allowed is None else allowed
    frame = _allowed(index, level, allowed)
    if scope.study_uid is not None:
        if not allowed.allows_study(scope.study_uid) or \
                index.frame(S).filter(pl.col("study_uid") == scope.study_uid).height == 0:
            raise NotFound(f"no study {scope.study_uid} in the index")
        frame = frame.filter(pl.col("study_uid") == scope.study_uid)
    if scope.series_uid is not None:
        series = _allowed(index, R, allowed).filter(pl.col("series_uid") == scope.series_uid)
        if series.height == 0 or series["study_uid"][0] != scope.study_uid:
            raise NotFound(f"no series {scope.series_uid} in study {scope.study_uid} in the index")
        frame = frame.filter(pl.col("series_uid") == scope.series_uid)
    for attribute, value in query.filters:
        frame = frame.filter(match_expression(attribute, value))
    page = frame.slice(query.offset, query.limit)
    if page.height == 0:
        return b"[]"
    attributes = sorted(defaults(level) | query.returned, key=lambda a: a.tag)
    root = base_url.rstrip("/") + DICOMWEB_ROOT
    elements = [(a.key, _element(a, page.schema[a.column])) for a in attributes]
    elements.append((RETRIEVE_URL_KEY, _retrieve_url(level, root)))
    encoded = page.select(pl.struct([expr for _, expr in sorted(elements, key=lambda e: e[0])]).struct.json_encode())
    return ("[" + ",".join(_strip_nulls(encoded.to_series(), attributes).to_list()) + "]").encode("utf-8")


# The page is encoded by polars in one pass (Python dicts for a thousand studies cost ten times
# as much): every attribute a struct {vr, Value}, every row a struct of them, as JSON. Arrow
# writes absent values as null; DICOM JSON leaves them out (F.2.5), so the nulls are cut from
# the text afterwards. The patterns begin or end with an unescaped quote, which a string value
# never holds (it is written \"), so they only ever meet the structure.

def _element(attribute: Attribute, dtype: pl.DataType) -> pl.Expr:
    col = pl.col(attribute.column)
    if isinstance(dtype, pl.List):
        value = pl.when(col.list.len() > 0).then(col)
    elif attribute.vr == "PN":
        groups = col.str.split("=")
        value = pl.when(col.is_not_null() & (col != "")).then(pl.concat_list(pl.struct([
            pl.when(groups.list.get(i, null_on_oob=True) != "").then(groups.list.get(i, null_on_oob=True)).alias(name)
            for i, name in enumerate(PN_GROUPS)])))
    else:
        value = pl.when(col.is_not_null()).then(pl.concat_list(col))
    element = pl.struct([pl.lit(attribute.vr).alias("vr"), value.alias("Value")])
    if attribute.omit_empty:
        element = pl.when(col.is_not_null()).then(element)
    return element.alias(attribute.key)


def _retrieve_url(level: Level, root: str) -> pl.Expr:
    parts: list[pl.Expr] = [pl.lit(f"{root}/studies/"), pl.col("study_uid")]
    if level != S:
        parts += [pl.lit("/series/"), pl.col("series_uid")]
    if level == I:
        parts += [pl.lit("/instances/"), pl.col("sop_instance_uid")]
    return pl.struct([pl.lit("UR").alias("vr"), pl.concat_list(pl.concat_str(parts)).alias("Value")]).alias(
        RETRIEVE_URL_KEY)


def _strip_nulls(encoded: pl.Series, attributes: list[Attribute]) -> pl.Series:
    patterns = [',"Value":null', ',"Ideographic":null', ',"Phonetic":null', '"Alphabetic":null,']
    for attribute in attributes:
        if attribute.omit_empty:
            patterns += [f'"{attribute.key}":null,', f',"{attribute.key}":null']
    for pattern in patterns:
        encoded = encoded.str.replace_all(pattern, "", literal=True)
    return encoded
