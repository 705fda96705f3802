"""Which Dagster GraphQL operations an identity may send: the roles mapped onto what Dagster OSS
can enforce, decided at the gateway before the webserver sees the request.

- Queries and subscriptions: everyone (what they show is the UI; patient data is behind DICOMweb).
- Run launches: an admin any; a project manager runs of their projects; a scientist evaluations
  of their projects; a viewer none. A run's project is its partitions' project: a cohort
  partition's project is the `project:` of the cohort's definition; a run of no partition, or of
  a partition of no known project, is an admin's.
- Every other mutation (terminate, wipe, sensors on and off, reload): an admin's only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from kaapana_assets.access.identity import Identity
from kaapana_assets.gateway.graphql import Launch, Operation
from kaapana_assets.projects.membership import DEFAULT_PROJECT, ProjectNameError, project_name

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def write_refusal(identity: Identity, surface: str, method: str) -> str | None:
    """Why a request that writes (any method but GET, HEAD, OPTIONS) outside Dagster's GraphQL
    is refused, or None. Dagster's REST writes (`/report_asset_materialization/…` and the like)
    are an admin's; MLflow's UI and STOW-RS need a role that may launch."""
    if method.upper() in SAFE_METHODS or identity.is_admin:
        return None
    if surface == "dagster":
        return f"{identity.user} may not write to Dagster outside GraphQL"
    if not identity.may_launch:
        return f"{identity.user} ({', '.join(sorted(identity.roles)) or 'no role'}) may read only"
    return None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    launches: tuple[tuple[Launch, str | None], ...] = ()  # each allowed launch and its project


def launch_project(launch: Launch, project_of_cohort: Callable[[str], str | None]) -> str | None:
    """The one project of a launch's partitions; None when it has none, or several."""
    projects = {project_of_cohort(partition) for partition in launch.partitions}
    return projects.pop() if len(projects) == 1 else None


def decide(identity: Identity, op: Operation, project_of_cohort: Callable[[str], str | None],
           evaluation_assets: frozenset[str]) -> Decision:
    if not op.mutates:
        return Decision(True, "not a mutation")
    if not identity.may_launch:
        return Decision(False, f"{identity.user} ({', '.join(sorted(identity.roles)) or 'no role'}) may not change "
                               f"anything: {', '.join(op.fields)} refused")
    if not op.launches_only and not identity.is_admin:
        return Decision(False, f"only an admin may send {', '.join(f for f in op.fields)}")
    allowed = []
    for launch in op.launches:
        project = launch_project(launch, project_of_cohort)
        names = launch.asset_roots or ({launch.job} if launch.job else set())
        evaluation = bool(names) and names <= evaluation_assets
        if not identity.may_launch_for(project, evaluation=evaluation):
            what = f"{launch.job or 'assets ' + ','.join(sorted(launch.asset_roots)) or 'a run'}"
            partitions = ",".join(sorted(launch.partitions)) or "no partition"
            return Decision(False, f"{identity.user} may not launch {what} ({partitions}) of project "
                                   f"{project or '(none: an admin’s)'}")
        allowed.append((launch, project))
    return Decision(True, "launch of the user's projects", tuple(allowed))


class CohortProjects:
    """A cohort's project, from the `project:` of its definition in the cohorts folder (read at
    each lookup: launches are rare and definitions change without a restart); a definition
    without one belongs to the default project."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, cohort: str) -> str | None:
        for path in sorted(self.folder.glob("*.y*ml")) if self.folder.is_dir() else []:
            try:
                data = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(data, dict) and data.get("name") == cohort:
                try:
                    return project_name(str(data.get("project") or DEFAULT_PROJECT))
                except ProjectNameError:
                    return None
        return None
