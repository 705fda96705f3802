"""Writing `series_projects`: what the ingest assigns, and the explicit, logged moves of
`kaapana project add-series / remove-series`.

Rules (docs/projects.md):
- a series gets every project its arrivals named (sent to KP-LUNG and to KP-LIVER: both);
- an arrival that names no project assigns the default project, but only to a series that
  has no project yet (sending a lung series again through the plain spool keeps it in lung);
- a name that is no project (`KP-TYPO`, `incoming/projects/typo/`) counts as none, with a
  warning: nothing is lost, and an operator moves it;
- every row is a MERGE keyed on (series_uid, project): a re-run commits nothing.
- an operator's change writes its `project_changes` rows before it touches `series_projects`,
  so no change is ever unlogged; a series never leaves its last project for none: removing
  it from its last project puts it in the default project (logged as well), and removing it
  from the default project when that is its last is refused.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import polars as pl
import pyarrow as pa

from kaapana_assets.dicom.uids import is_valid_uid
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import PROJECT_CHANGES, SERIES, SERIES_PROJECTS
from kaapana_assets.lake.tables import WriteResult
from kaapana_assets.projects.catalog import known_projects, require_project
from kaapana_assets.projects.membership import DEFAULT_PROJECT, project_name
from kaapana_assets.projects.routing import STOW_RS_SENDER, project_of_path

log = logging.getLogger(__name__)


class AssignedBy(StrEnum):
    """What put a series in a project (`series_projects.assigned_by`)."""

    CALLED_AE = "called-ae"
    SPOOL_FOLDER = "spool-folder"
    STOW_PATH = "stow-path"
    DEFAULT = "default"
    OPERATOR = "operator"
    DERIVED = "derived"  # a SEG this platform made: the projects of the series it segments


@dataclass(frozen=True)
class Arrived:
    """One ingested series and the project its arrival named (None: none)."""

    series_uid: str
    study_uid: str
    project: str | None
    assigned_by: AssignedBy


@dataclass(frozen=True)
class ProjectSource:
    """Where an ingest reads the project of a file from: `project` for every file (`kaapana
    ingest --project`), else the project folder it waits in under `spool`, else none."""

    spool: Path | None = None
    project: str | None = None

    def __post_init__(self) -> None:
        if self.project is not None:
            object.__setattr__(self, "project", project_name(self.project))

    def arrived(self, source: str, series_uid: str, study_uid: str, calling_ae_title: str | None = None,
                called_ae_title: str | None = None) -> Arrived:
        """The project a file names, and what named it: a STOW-RS path (its Sending AE title is
        STOW-RS's), a called AE title (a receiver recorded one), or else the folder itself."""
        if self.project is not None:
            return Arrived(series_uid, study_uid, self.project, AssignedBy.OPERATOR)
        project = project_of_path(self.spool, source) if self.spool is not None else None
        if project is None:
            return Arrived(series_uid, study_uid, None, AssignedBy.DEFAULT)
        if calling_ae_title == STOW_RS_SENDER:
            return Arrived(series_uid, study_uid, project, AssignedBy.STOW_PATH)
        return Arrived(series_uid, study_uid, project,
                       AssignedBy.CALLED_AE if called_ae_title else AssignedBy.SPOOL_FOLDER)


class ChangeAction(StrEnum):
    ADD = "add"
    REMOVE = "remove"


@dataclass(frozen=True)
class Change:
    """What one `add-series` / `remove-series` did."""

    change_id: str
    project: str
    action: ChangeAction
    changed: tuple[str, ...]  # the series whose membership changed
    unchanged: tuple[str, ...]  # already so
    moved_to_default: tuple[str, ...] = ()  # removed from their last project: now in the default one


class ChangeRefused(ValueError):
    pass


def _rows(pairs: Iterable[tuple[str, str, str, str]], now: dt.datetime) -> pa.Table:
    return pa.Table.from_pylist(
        [{"series_uid": s, "study_uid": st, "project": p, "assigned_by": by, "assigned_at": now}
         for s, st, p, by in pairs], schema=SERIES_PROJECTS.schema)


def assign_ingested(lake: Lake, arrived: Iterable[Arrived]) -> WriteResult | None:
    """The `series_projects` rows of series an ingest indexed (see the module's rules). One
    read and at most one MERGE; None when every row is there already."""
    arrived = list(arrived)
    if not arrived:
        return None
    # The catalog only when an arrival names a project: a plain ingest reads one table, not two.
    known = known_projects(lake) if any(a.project is not None for a in arrived) else frozenset()
    series = sorted({a.series_uid for a in arrived})
    existing = lake.read(SERIES_PROJECTS, pl.col("series_uid").is_in(series)).select("series_uid", "project")
    have = set(zip(existing["series_uid"].to_list(), existing["project"].to_list(), strict=True))
    with_project = {s for s, _ in have}
    wanted: dict[tuple[str, str], tuple[str, str]] = {}  # (series, project) → (study, assigned_by)
    unnamed: list[Arrived] = []  # named no project, or one that does not exist
    for a in arrived:
        if a.project is not None and a.project not in known:
            log.warning("series %s arrived for project %r, which does not exist: it goes to the default project "
                        "%r unless it has a project (create the project, then `kaapana project add-series`)",
                        a.series_uid, a.project, DEFAULT_PROJECT)
        if a.project is None or a.project not in known:
            unnamed.append(a)
        else:
            wanted.setdefault((a.series_uid, a.project), (a.study_uid, a.assigned_by))
    named = {s for s, _ in wanted}
    for a in unnamed:
        if a.series_uid not in with_project and a.series_uid not in named:
            wanted.setdefault((a.series_uid, DEFAULT_PROJECT), (a.study_uid, AssignedBy.DEFAULT))
    new = [(s, st, p, str(by)) for (s, p), (st, by) in sorted(wanted.items()) if (s, p) not in have]
    if not new:
        return None
    return lake.merge(SERIES_PROJECTS, _rows(new, dt.datetime.now(dt.timezone.utc)))


def inherit_projects(lake: Lake, derived: Mapping[str, tuple[str, str]]) -> WriteResult | None:
    """Derived series (a model's SEG: series → (study, the series it was made from)) join the
    projects of their source series, so whoever may see a series sees its segmentations; a
    source in no project gives the default project."""
    if not derived:
        return None
    # One read for sources and derived series alike: this runs in every segmentation commit.
    uids = sorted({*derived, *(source for _, source in derived.values())})
    rows = lake.read(SERIES_PROJECTS, pl.col("series_uid").is_in(uids)).select("series_uid", "project")
    have = set(zip(rows["series_uid"].to_list(), rows["project"].to_list(), strict=True))
    projects_of: dict[str, set[str]] = {}
    for series_uid, project in have:
        projects_of.setdefault(series_uid, set()).add(project)
    new = [(series_uid, study_uid, project, str(AssignedBy.DERIVED))
           for series_uid, (study_uid, source) in sorted(derived.items())
           for project in sorted(projects_of.get(source) or {DEFAULT_PROJECT})
           if (series_uid, project) not in have]
    if not new:
        return None
    return lake.merge(SERIES_PROJECTS, _rows(new, dt.datetime.now(dt.timezone.utc)))


def _indexed(lake: Lake, series_uids: Sequence[str]) -> dict[str, str]:
    """series → study of indexed series; a clear error naming what is not a UID or not indexed."""
    bad = [uid for uid in series_uids if not is_valid_uid(uid)]
    if bad:
        raise ChangeRefused(f"not SeriesInstanceUIDs: {', '.join(bad[:5])}")
    rows = lake.read(SERIES, pl.col("series_uid").is_in(list(series_uids))).select("series_uid", "study_uid")
    found = dict(zip(rows["series_uid"].to_list(), rows["study_uid"].to_list(), strict=True))
    missing = [uid for uid in series_uids if uid not in found]
    if missing:
        raise ChangeRefused(f"not indexed (no series row): {', '.join(missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return found


def _log(lake: Lake, change_id: str, entries: Iterable[tuple[str, str, ChangeAction, str]], operator: str,
         now: dt.datetime) -> None:
    rows = [{"change_id": change_id, "series_uid": s, "project": p, "action": str(a), "operator": operator,
             "reason": reason, "changed_at": now} for s, p, a, reason in entries]
    if rows:
        lake.merge(PROJECT_CHANGES, pa.Table.from_pylist(rows, schema=PROJECT_CHANGES.schema))


def _checked(operator: str, reason: str) -> tuple[str, str]:
    if not operator.strip():
        raise ChangeRefused("who makes this change? give --operator (or set KAAPANA_OPERATOR)")
    if not reason.strip():
        raise ChangeRefused("why? a change of project membership needs a --reason")
    return operator.strip(), reason.strip()


def add_series(lake: Lake, project: str, series_uids: Sequence[str], *, operator: str, reason: str) -> Change:
    """Put indexed series into a project as well (sharing; remove them elsewhere to move)."""
    operator, reason = _checked(operator, reason)
    project = require_project(lake, project)
    series = list(dict.fromkeys(series_uids))
    study_of = _indexed(lake, series)
    present = set(lake.read(SERIES_PROJECTS, (pl.col("project") == project) & pl.col("series_uid").is_in(series))
                  ["series_uid"].to_list())
    changed = [s for s in series if s not in present]
    change_id, now = uuid.uuid4().hex, dt.datetime.now(dt.timezone.utc)
    _log(lake, change_id, ((s, project, ChangeAction.ADD, reason) for s in changed), operator, now)
    if changed:
        lake.merge(SERIES_PROJECTS, _rows(((s, study_of[s], project, str(AssignedBy.OPERATOR)) for s in changed), now))
    return Change(change_id, project, ChangeAction.ADD, tuple(changed), tuple(s for s in series if s in present))


def remove_series(lake: Lake, project: str, series_uids: Sequence[str], *, operator: str, reason: str) -> Change:
    """Take series out of a project; the series themselves stay indexed and archived."""
    operator, reason = _checked(operator, reason)
    project = require_project(lake, project)
    series = list(dict.fromkeys(series_uids))
    study_of = _indexed(lake, series)
    rows = lake.read(SERIES_PROJECTS, pl.col("series_uid").is_in(series)).select("series_uid", "project")
    projects_of: dict[str, set[str]] = {}
    for s, p in zip(rows["series_uid"].to_list(), rows["project"].to_list(), strict=True):
        projects_of.setdefault(s, set()).add(p)
    changed = [s for s in series if project in projects_of.get(s, set())]
    last = [s for s in changed if projects_of[s] == {project}]
    if project == DEFAULT_PROJECT and last:
        raise ChangeRefused(f"{', '.join(last[:5])}: the default project is their only project; add them to "
                            "another project first (a series always belongs to at least one)")
    change_id, now = uuid.uuid4().hex, dt.datetime.now(dt.timezone.utc)
    moved = f"{reason} (its last project {project!r} removed: into the default project)"
    _log(lake, change_id, [*((s, project, ChangeAction.REMOVE, reason) for s in changed),
                           *((s, DEFAULT_PROJECT, ChangeAction.ADD, moved) for s in last)], operator, now)
    if last:
        lake.merge(SERIES_PROJECTS, _rows(((s, study_of[s], DEFAULT_PROJECT, str(AssignedBy.OPERATOR))
                                           for s in last), now))
    if changed:
        # Validated values only: a project name and UIDs (digits and dots).
        listed = ", ".join(f"'{s}'" for s in changed)
        lake.delete(SERIES_PROJECTS, f"project = '{project}' AND series_uid IN ({listed})")
    return Change(change_id, project, ChangeAction.REMOVE, tuple(changed), tuple(s for s in series if s not in changed),
                  tuple(last))


def unassigned_series(lake: Lake) -> list[str]:
    """Indexed series in no project: a home indexed before projects existed (`kaapana project
    add-series admin --unassigned` gives them one)."""
    assigned = lake.read(SERIES_PROJECTS).select("series_uid").unique()
    rows = lake.read(SERIES).select("series_uid").join(assigned, on="series_uid", how="anti")
    return sorted(rows["series_uid"].to_list())


def history(lake: Lake, series_uid: str | None = None) -> pl.DataFrame:
    """The `project_changes` rows (of one series), oldest first."""
    where = pl.col("series_uid") == series_uid if series_uid else None
    return lake.read(PROJECT_CHANGES, where).sort("changed_at", "project")


def projects_of_series(lake: Lake, series_uids: Sequence[str], version: int | None = None) -> Mapping[str, list[str]]:
    """series → its projects (at a version of `series_projects`), for lineage and listings."""
    rows = lake.read(SERIES_PROJECTS, pl.col("series_uid").is_in(list(series_uids)), version=version)
    out: dict[str, list[str]] = {}
    for s, p in zip(rows["series_uid"].to_list(), rows["project"].to_list(), strict=True):
        out.setdefault(s, []).append(p)
    return {s: sorted(ps) for s, ps in out.items()}
