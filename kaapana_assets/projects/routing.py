"""Which project an arrival belongs to, before it is read: from the called AE title of a
C-STORE (Kaapana's `KP-<PROJECT>`, or an explicit mapping), and from where it waits in the
spool (`incoming/projects/<project>/…`, which the receiver, STOW-RS and users fill alike).

Only names are decided here; the ingest resolves them against the `projects` table (an
unknown name lands in the default project, see `assignment.py`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kaapana_assets.projects.membership import ProjectNameError, project_name

# incoming/projects/<project>/<calling AE>/<file>: one folder per project in the spool.
PROJECTS_FOLDER = "projects"
# Kaapana's convention: a modality sends to the called AE title KP-<PROJECT>.
KAAPANA_PREFIX = "KP-"
# The Sending AE title STOW-RS records (dicomweb/stow.py): the ingest tells a STOW-RS arrival by it.
STOW_RS_SENDER = "STOW-RS"


@dataclass(frozen=True)
class AeTitleRouting:
    """Called AE title → project: an explicit mapping first (any AE title, e.g. a scanner that
    cannot be reconfigured), else `<prefix><PROJECT>`. AE titles compare case-insensitively."""

    explicit: Mapping[str, str] = field(default_factory=dict)
    prefix: str = KAAPANA_PREFIX

    @classmethod
    def parse(cls, mapping: Mapping[str, str], prefix: str = KAAPANA_PREFIX) -> AeTitleRouting:
        """A mapping as configured (KAAPANA_PROJECT_AE_TITLES), each project name validated."""
        if not isinstance(mapping, Mapping):
            raise ValueError("the AE title → project mapping must be an object of AE titles and project names")
        explicit: dict[str, str] = {}
        for ae_title, project in mapping.items():
            if not isinstance(ae_title, str) or not isinstance(project, str) or not 0 < len(ae_title.strip()) <= 16:
                raise ValueError(f"AE title mapping {ae_title!r}: {project!r}: expected an AE title (1–16 characters) "
                                 "and a project name")
            try:
                explicit[ae_title.strip().upper()] = project_name(project)
            except ProjectNameError as exc:
                raise ValueError(f"AE title mapping {ae_title!r}: {exc}") from None
        return cls(explicit, prefix)

    def project_of(self, called_ae_title: str) -> str | None:
        """The project named by a called AE title, or None (then the default project)."""
        called = called_ae_title.strip().upper()
        if called in self.explicit:
            return self.explicit[called]
        prefix = self.prefix.upper()
        if prefix and called.startswith(prefix) and len(called) > len(prefix):
            try:
                return project_name(called[len(prefix):])
            except ProjectNameError:
                return None
        return None


def project_spool(spool: Path, project: str) -> Path:
    """The spool folder of one project."""
    return spool / PROJECTS_FOLDER / project_name(project)


def project_of_path(spool: Path, path: str | Path) -> str | None:
    """The project a spool file's folder names (`<spool>/projects/<name>/…`), or None: a file
    elsewhere, or under a folder that is no project name."""
    try:
        parts = Path(path).relative_to(spool).parts
    except ValueError:
        return None
    if len(parts) < 3 or parts[0] != PROJECTS_FOLDER:
        return None
    try:
        return project_name(parts[1])
    except ProjectNameError:
        return None
