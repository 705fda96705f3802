"""The series and studies of a set of projects, read from `series_projects`."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl

from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import SERIES_PROJECTS

# Where nothing else assigns a project (an unknown AE title, the plain spool): Kaapana's "admin" project.
DEFAULT_PROJECT = "admin"
# Lower-case letters, digits and dashes: usable in an AE title (KP-<PROJECT>, 16 characters),
# a folder name and a URL path segment alike.
PROJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,12}$")


class ProjectNameError(ValueError):
    pass


def project_name(name: str) -> str:
    """A project name as written everywhere (lower case), or a clear error."""
    normal = name.strip().lower()
    if not PROJECT_NAME.match(normal):
        raise ProjectNameError(
            f"project name {name!r}: use 1–13 lower-case letters, digits or dashes, starting with a letter or digit"
        )
    return normal


@dataclass(frozen=True)
class ProjectScope:
    """What one reader may see: the series and studies of its projects, at one table version.

    `everything` is the admin's scope (no filter)."""

    projects: frozenset[str]
    series_uids: frozenset[str]
    study_uids: frozenset[str]
    version: int | None
    everything: bool = False

    def allows_series(self, series_uid: str) -> bool:
        return self.everything or series_uid in self.series_uids

    def allows_study(self, study_uid: str) -> bool:
        return self.everything or study_uid in self.study_uids


def scope_of(lake: Lake, projects: Iterable[str], version: int | None = None) -> ProjectScope:
    """The series and studies of `projects` (at `version` of `series_projects`, default latest)."""
    wanted = frozenset(project_name(project) for project in projects)
    if version is None:
        version = lake.version(SERIES_PROJECTS)
    rows = lake.read(SERIES_PROJECTS, where=pl.col("project").is_in(sorted(wanted)), version=version)
    return ProjectScope(
        projects=wanted,
        series_uids=frozenset(rows["series_uid"].to_list()),
        study_uids=frozenset(rows["study_uid"].to_list()),
        version=version,
    )


def everything() -> ProjectScope:
    return ProjectScope(frozenset(), frozenset(), frozenset(), None, everything=True)
