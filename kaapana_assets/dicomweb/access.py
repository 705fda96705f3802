"""Who asks, behind the gateway: the identity the gateway signed into IDENTITY_HEADER, its
project scope (what QIDO-RS answers and WADO-RS serves), and the audit of each access.

Without an identity secret (the service on its own, `make dev`) every request sees everything.
With one, a request without a valid signed header gets 401: only the gateway reaches the service."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from kaapana_assets.access.audit import Action, AuditEvent, AuditLog, Via
from kaapana_assets.access.identity import IDENTITY_HEADER, Identity, IdentityError, read_header
from kaapana_assets.access.scopes import ScopeCache
from kaapana_assets.projects.membership import ProjectScope, everything


class IdentityMiddleware:
    def __init__(self, app: ASGIApp, secret: bytes, scopes: ScopeCache) -> None:
        self.app, self.secret, self.scopes = app, secret, scopes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        value = Headers(scope=scope).get(IDENTITY_HEADER)
        try:
            if value is None:
                raise IdentityError("no identity: this service answers only through the gateway")
            identity = read_header(value, self.secret)
        except IdentityError as exc:
            await PlainTextResponse(str(exc), status_code=401)(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["identity"] = identity
        state["project_scope"] = await run_in_threadpool(self.scopes.scope, identity)
        await self.app(scope, receive, send)


def identity_of(request: Request) -> Identity | None:
    return request.scope.get("state", {}).get("identity")


def project_scope(request: Request) -> ProjectScope:
    """What the request may see: its identity's projects, or everything without an identity."""
    found: ProjectScope | None = request.scope.get("state", {}).get("project_scope")
    return everything() if found is None else found


def audit(log: AuditLog | None, request: Request, action: Action, study_uid: str | None = None,
          series_uid: str | None = None, sop_instance_uid: str | None = None) -> None:
    """Queue one audit row for an access by the request's identity (none without one)."""
    identity = identity_of(request)
    if log is not None and identity is not None:
        log.record(AuditEvent(identity, action, Via.DICOMWEB, study_uid, series_uid, sop_instance_uid))
