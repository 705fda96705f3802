"""The project scope of an identity, cached per version of `series_projects`.

The table's version is read at most once per `recheck_s` (as the DICOMweb index does): a series
assigned to a project a moment ago is visible within that second."""

from __future__ import annotations

import threading
import time

from kaapana_assets.access.identity import Identity
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import SERIES_PROJECTS
from kaapana_assets.projects.membership import ProjectScope, everything, scope_of

RECHECK_S = 1.0


class ScopeCache:
    def __init__(self, lake: Lake, recheck_s: float = RECHECK_S) -> None:
        self.lake, self.recheck_s = lake, recheck_s
        self._lock = threading.Lock()
        self._version: int | None = None
        self._checked = float("-inf")
        self._scopes: dict[frozenset[str], ProjectScope] = {}

    def _current_version(self) -> int | None:
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.recheck_s:
                return self._version
        version = self.lake.version(SERIES_PROJECTS)
        with self._lock:
            if version != self._version:
                self._scopes.clear()
            self._version, self._checked = version, now
            return version

    def scope(self, identity: Identity) -> ProjectScope:
        """Everything for an admin; else the series and studies of the identity's projects."""
        if identity.is_admin:
            return everything()
        version = self._current_version()
        with self._lock:
            found = self._scopes.get(identity.projects)
        if found is not None and found.version == version:
            return found
        if version is None:  # no project has any series yet
            found = ProjectScope(identity.projects, frozenset(), frozenset(), None)
        else:
            found = scope_of(self.lake, identity.projects, version)
        with self._lock:
            self._scopes[identity.projects] = found
        return found
