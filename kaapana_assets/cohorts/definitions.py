"""Cohort definitions: YAML files, validated with pydantic. A bad file gets an error that
names the file and the field."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from kaapana_assets.dicom.seg_segments import AlgorithmType
from kaapana_assets.dicom.uids import is_valid_uid
from kaapana_assets.projects.membership import DEFAULT_PROJECT, ProjectNameError, project_name

EXAMPLES = Path(__file__).parent / "examples"
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


class CohortDefinitionError(ValueError):
    def __init__(self, path: Path | str, field: str, message: str):
        self.path, self.field = str(path), field
        super().__init__(f"{path}: {field}: {message}")


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


StrList = Annotated[list[str], BeforeValidator(_as_list)]


def _upper_list(value: Any) -> Any:
    value = _as_list(value)
    return [v.upper() if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


class Range(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def ordered(self) -> "Range":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self


class DateRange(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    start: dt.date | None = Field(default=None, alias="from")
    end: dt.date | None = Field(default=None, alias="to")


class CohortFilter(BaseModel):
    """A filter over the `series` table. Every given field must match (AND); a list
    matches any of its values (OR)."""

    model_config = ConfigDict(extra="forbid")
    modality: StrList | None = None
    body_part: StrList | None = None
    manufacturer: StrList | None = None
    institution: StrList | None = None
    slice_thickness: Range | None = None
    series_description: str | None = Field(default=None, description="regular expression, searched")
    study_date: DateRange | None = None
    tags: StrList | None = Field(default=None, description="series must carry all of these tags")
    has_reference_segmentation: bool | None = None
    include_series: StrList = Field(default_factory=list, description="always members (if indexed)")
    exclude_series: StrList = Field(default_factory=list, description="never members")
    # Held out per patient: a series is left out when its patient is in the latest version of
    # any of these cohorts (when this cohort is snapshotted; the version read is recorded).
    exclude_cohorts: StrList = Field(default_factory=list, description="never a patient of these cohorts")
    exclude_tags: StrList = Field(default_factory=list, description="never a series carrying any of these tags")

    @field_validator("series_description")
    @classmethod
    def regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @field_validator("include_series", "exclude_series")
    @classmethod
    def uids(cls, values: list[str]) -> list[str]:
        bad = [v for v in values if not is_valid_uid(v)]
        if bad:
            raise ValueError(f"not valid SeriesInstanceUIDs: {bad[:3]}")
        return values

    @field_validator("tags", "exclude_tags")
    @classmethod
    def tag_names(cls, values: list[str] | None) -> list[str] | None:
        for v in values or []:
            validate_tag(v)
        return values

    @field_validator("exclude_cohorts")
    @classmethod
    def cohort_names(cls, values: list[str]) -> list[str]:
        bad = [v for v in values if not NAME.fullmatch(v)]
        if bad:
            raise ValueError(f"not cohort names: {bad[:3]}")
        return values


class Harmonization(BaseModel):
    """Tolerances of the pre-learning checks."""

    model_config = ConfigDict(extra="forbid")
    slice_thickness_tolerance_mm: float = Field(default=0.5, ge=0)
    pixel_spacing_tolerance_mm: float = Field(default=0.5, ge=0)
    min_size: int = Field(default=2, ge=1)
    require_axial: bool = True
    require_complete: bool = True


class CohortDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    purpose: Literal["train", "test", "inference"]
    # The research project whose series the cohort selects from (and only from).
    project: str = DEFAULT_PROJECT
    required_labels: StrList = Field(default_factory=list)
    filter: CohortFilter = Field(default_factory=CohortFilter)
    harmonization: Harmonization = Field(default_factory=Harmonization)
    # Which SEGs are references (cohorts/references.py): every segment a SEG contributes must be
    # of one of these Segment Algorithm Types; a SEG of this platform's models never is one.
    reference_algorithm_types: Annotated[list[AlgorithmType], BeforeValidator(_upper_list)] = Field(
        default_factory=lambda: [AlgorithmType.MANUAL, AlgorithmType.SEMIAUTOMATIC], min_length=1)
    # Overlapping segments: a voxel takes the first of these labels it belongs to; labels not
    # listed come after them, the smaller structure (fewer voxels) on top.
    label_priority: StrList = Field(default_factory=list)

    @field_validator("label_priority")
    @classmethod
    def distinct(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError(f"labels listed twice: {sorted({v for v in values if values.count(v) > 1})}")
        return values

    @field_validator("name")
    @classmethod
    def valid_name(cls, value: str) -> str:
        if not NAME.fullmatch(value):
            raise ValueError("use lowercase letters, digits, '.', '_' and '-' (at most 63)")
        return value

    @field_validator("project")
    @classmethod
    def valid_project(cls, value: str) -> str:
        try:
            return project_name(value)
        except ProjectNameError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def not_excluding_itself(self) -> "CohortDefinition":
        if self.name in self.filter.exclude_cohorts:
            raise ValueError(f"filter.exclude_cohorts names the cohort itself ({self.name!r})")
        return self

    def digest(self) -> str:
        # A definition of the default project hashes as it did before cohorts had projects.
        dumped = self.model_dump(mode="json", exclude={"project"} if self.project == DEFAULT_PROJECT else None)
        return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]


def validate_tag(tag: str) -> str:
    if not TAG.fullmatch(tag):
        raise ValueError(f"tag {tag!r}: use letters, digits, '_', '.', ':' and '-' (at most 64)")
    return tag


def parse_definition(text: str, source: Path | str = "<text>") -> CohortDefinition:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CohortDefinitionError(source, "(yaml)", str(exc).replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise CohortDefinitionError(source, "(document)", "expected a mapping with name, purpose, filter, ...")
    try:
        return CohortDefinition.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(document)"
        raise CohortDefinitionError(source, field, first["msg"]) from None


def load_definition(path: Path) -> CohortDefinition:
    definition = parse_definition(path.read_text(encoding="utf-8"), path)
    if definition.name != path.stem:
        raise CohortDefinitionError(path, "name", f"{definition.name!r} must match the file name {path.stem!r}")
    return definition


def load_definitions(folder: Path) -> tuple[dict[str, CohortDefinition], list[CohortDefinitionError]]:
    """All valid definitions of a folder, and the errors of the invalid ones."""
    found: dict[str, CohortDefinition] = {}
    errors: list[CohortDefinitionError] = []
    for path in sorted(folder.glob("*.y*ml")) if folder.exists() else []:
        try:
            definition = load_definition(path)
        except CohortDefinitionError as exc:
            errors.append(exc)
            continue
        found[definition.name] = definition
    return found, errors
