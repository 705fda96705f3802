"""An identity from an OpenID Connect token's claims, its roles, and what each role may do.

The gateway validates the token; the services behind it read the identity from a header the
gateway signs (HMAC-SHA256 with a secret both share), never from the request's own claims."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kaapana_assets.projects.membership import project_name

# The header the gateway signs the identity into; the gateway drops it from every request it
# receives, so only the gateway can have set it.
IDENTITY_HEADER = "x-kaapana-identity"
# A signed header older than this is refused: a header copied from a log stops working soon.
HEADER_MAX_AGE_S = 300


class Role(StrEnum):
    """Kaapana's roles as the token names them."""

    ADMIN = "admin"  # everything, every project
    PROJECT_MANAGER = "project-manager"  # launch runs and edit cohorts of their projects
    SCIENTIST = "scientist"  # read their projects, launch evaluations
    VIEWER = "viewer"  # read their projects


class IdentityError(ValueError):
    """A token or header that names no usable identity (the gateway answers 401)."""


@dataclass(frozen=True)
class ClaimNames:
    """Where the roles and projects are in the token: dotted paths, the first one present wins.
    Keycloak's realm roles are `realm_access.roles`; its client roles
    `resource_access.<client>.roles`; a group or attribute mapper writes a flat claim."""

    roles: tuple[str, ...] = ("realm_access.roles", "roles")
    projects: tuple[str, ...] = ("projects",)
    user: tuple[str, ...] = ("preferred_username", "sub")


def _claim(claims: Mapping[str, Any], paths: tuple[str, ...]) -> Any:
    for path in paths:
        value: Any = claims
        for part in path.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is not None:
            return value
    return None


def _strings(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise IdentityError(f"the token's {what} claim is not a list of strings: {value!r}")


@dataclass(frozen=True)
class Identity:
    user: str
    roles: frozenset[Role]
    projects: frozenset[str]

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any], names: ClaimNames = ClaimNames()) -> Identity:
        """The identity of validated claims; roles the platform does not know are ignored
        (a realm carries others), projects are normalised (`project_name`)."""
        user = _claim(claims, names.user)
        if not isinstance(user, str) or not user:
            raise IdentityError(f"the token names no user ({' or '.join(names.user)})")
        known = {role.value for role in Role}
        roles = frozenset(Role(r) for r in _strings(_claim(claims, names.roles), "roles") if r in known)
        projects = frozenset(project_name(p) for p in _strings(_claim(claims, names.projects), "projects"))
        return cls(user, roles, projects)

    @property
    def is_admin(self) -> bool:
        return Role.ADMIN in self.roles

    @property
    def may_launch(self) -> bool:
        """Whether the user may launch anything (a project manager's runs, a scientist's
        evaluations); a viewer, and a user with no known role, may not."""
        return bool(self.roles & {Role.ADMIN, Role.PROJECT_MANAGER, Role.SCIENTIST})

    def may_launch_for(self, project: str | None, *, evaluation: bool) -> bool:
        """Whether the user may launch a run of `project` (None: a run of no project, which
        only an admin may launch); a scientist only evaluations."""
        if self.is_admin:
            return True
        if project is None or project not in self.projects:
            return False
        return Role.PROJECT_MANAGER in self.roles or (evaluation and Role.SCIENTIST in self.roles)

    def to_json(self) -> dict[str, Any]:
        return {"user": self.user, "roles": sorted(self.roles), "projects": sorted(self.projects)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Identity:
        return cls(str(data["user"]), frozenset(Role(r) for r in data["roles"]),
                   frozenset(project_name(p) for p in data["projects"]))


def _mac(secret: bytes, payload: bytes) -> str:
    return hmac.new(secret, payload, hashlib.sha256).hexdigest()


def sign_header(identity: Identity, secret: bytes, now: float | None = None) -> str:
    """The identity header's value: base64url(JSON with the time it was signed) "." HMAC."""
    body = dict(identity.to_json(), at=int(time.time() if now is None else now))
    payload = base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode()).rstrip(b"=")
    return f"{payload.decode()}.{_mac(secret, payload)}"


def read_header(value: str, secret: bytes, now: float | None = None) -> Identity:
    """The identity a signed header carries; IdentityError when the signature does not match
    or the header is older than HEADER_MAX_AGE_S."""
    payload, _, mac = value.partition(".")
    if not hmac.compare_digest(_mac(secret, payload.encode()), mac):
        raise IdentityError("the identity header's signature does not match")
    try:
        body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        identity = Identity.from_json(body)
        at = int(body["at"])
    except (ValueError, KeyError, TypeError) as exc:
        raise IdentityError(f"the identity header is malformed: {exc}") from None
    if abs((time.time() if now is None else now) - at) > HEADER_MAX_AGE_S:
        raise IdentityError("the identity header has expired")
    return identity
