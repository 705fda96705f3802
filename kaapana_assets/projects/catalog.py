"""The `projects` table: which projects exist. The default project always does."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

import pyarrow as pa

from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import PROJECTS
from kaapana_assets.projects.membership import DEFAULT_PROJECT, project_name

DEFAULT_TITLE = "Default project (what no AE title, spool folder or STOW-RS path assigns)"


class ProjectExists(ValueError):
    pass


class UnknownProject(LookupError):
    def __str__(self) -> str:  # KeyError-like classes quote their message; this one reads as a sentence
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Project:
    project: str
    title: str
    description: str
    created_at: dt.datetime | None  # None: the default project, not written yet


def _row(project: str, title: str, description: str, now: dt.datetime) -> dict[str, object]:
    digest = hashlib.sha256(f"{project}\0{title}\0{description}".encode()).hexdigest()[:16]
    return {"project": project, "title": title, "description": description, "created_at": now,
            "row_digest": digest, "updated_at": now}


def list_projects(lake: Lake) -> list[Project]:
    """Every project, the default one first (listed even before anything wrote it)."""
    rows = lake.read(PROJECTS).sort("project")
    found = {r["project"]: Project(r["project"], r["title"], r["description"] or "", r["created_at"])
             for r in rows.iter_rows(named=True)}
    default = found.pop(DEFAULT_PROJECT, Project(DEFAULT_PROJECT, DEFAULT_TITLE, "", None))
    return [default, *found.values()]


def known_projects(lake: Lake) -> frozenset[str]:
    return frozenset(p.project for p in list_projects(lake))


def require_project(lake: Lake, name: str) -> str:
    """A project's name as written, or UnknownProject naming the known ones."""
    project = project_name(name)
    known = known_projects(lake)
    if project not in known:
        raise UnknownProject(f"no project {project!r}; known: {', '.join(sorted(known))} "
                             "(create it with `kaapana project create`)")
    return project


def create_project(lake: Lake, name: str, title: str, description: str = "") -> Project:
    """Add a project (and, with the first one, the default project's row)."""
    project = project_name(name)
    if not title.strip():
        raise ValueError(f"project {project!r}: give it a title")
    if project in known_projects(lake):
        raise ProjectExists(f"project {project!r} exists already")
    now = dt.datetime.now(dt.timezone.utc)
    rows = [_row(project, title.strip(), description.strip(), now)]
    if not lake.read(PROJECTS).height:
        rows.append(_row(DEFAULT_PROJECT, DEFAULT_TITLE, "", now))
    lake.merge(PROJECTS, pa.Table.from_pylist(rows, schema=PROJECTS.schema))
    return Project(project, title.strip(), description.strip(), now)
