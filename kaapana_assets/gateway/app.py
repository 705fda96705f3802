"""The gateway as one ASGI app: the login flow (authlib's OpenID Connect client), the identity of
every request (a session cookie or a bearer token), and a reverse proxy (aiohttp's client; websockets for
Dagster's GraphQL subscriptions) to the services on loopback, each request carrying the
identity in a header the gateway signs.

Nothing passes without an identity: API requests get 401, browser navigation is sent to the
login. Dagster GraphQL mutations are decided by `policy` before the webserver sees them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import aiohttp
import httpx
import websockets
from authlib.integrations.starlette_client import OAuth, OAuthError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from kaapana_assets.access.audit import Action, AuditEvent, Via
from kaapana_assets.access.identity import IDENTITY_HEADER, Identity, IdentityError, sign_header
from kaapana_assets.gateway import graphql, policy
from kaapana_assets.gateway.config import AUTH_ROOT, GatewayConfig
from kaapana_assets.gateway.tokens import TokenError, TokenValidator

SESSION_COOKIE = "kaapana_session"
# Never passed on: hop-by-hop headers (RFC 9110 7.6.1), our own identity header (only the
# gateway sets it), and the credentials the gateway has already checked.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host"})
DROPPED = HOP_BY_HOP | {IDENTITY_HEADER, "authorization", "cookie"}
BUFFERED_BYTES = 1 << 20  # answers up to this size are passed on whole, larger ones streamed


class Origin(StrEnum):
    """Which surface a listener's root is: the platform (Dagster at "/") or the viewer."""

    PLATFORM = "platform"
    VIEWER = "viewer"


@dataclass(frozen=True)
class Denied(Exception):
    response: Response


def _browser_navigation(connection: HTTPConnection) -> bool:
    return connection.scope.get("method") in ("GET", "HEAD") and "text/html" in connection.headers.get("accept", "")


class Gateway:
    def __init__(self, config: GatewayConfig, origin: Origin, metadata: Mapping[str, Any]) -> None:
        self.config, self.origin = config, origin
        oidc = config.oidc
        self.tokens = TokenValidator(oidc.issuer, oidc.audience, str(metadata["jwks_uri"]), oidc.leeway_s)
        self.oauth = OAuth()
        self.oauth.register("provider", client_id=oidc.client_id, client_secret=oidc.client_secret,
                            server_metadata_url=f"{oidc.issuer.rstrip('/')}/.well-known/openid-configuration",
                            client_kwargs={"scope": oidc.scope})
        self.session: aiohttp.ClientSession | None = None

    # identity ------------------------------------------------------------------------------

    async def identity(self, request: HTTPConnection) -> Identity:
        """The request's identity: a bearer token (validated), else the session; Denied with
        401, or a redirect to the login for a browser's navigation, when there is none."""
        authorization = request.headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
            try:
                # A token seen before is checked inline; a new one (an RSA check, perhaps a
                # fetch of the provider's keys) off the event loop.
                claims = self.tokens.cached(token)
                if claims is None:
                    claims = await run_in_threadpool(self.tokens.claims, token)
                return Identity.from_claims(claims, self.config.oidc.claims)
            except (TokenError, IdentityError, ValueError) as exc:
                raise Denied(_unauthorized(f"bearer token refused: {exc}")) from None
        session = request.session.get("identity")
        if session and float(request.session.get("expires_at", 0)) > time.time():
            try:
                return Identity.from_json(session)
            except (IdentityError, ValueError, KeyError):
                request.session.clear()
        if _browser_navigation(request):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise Denied(RedirectResponse(f"{AUTH_ROOT}/login?next={quote(target)}", status_code=302))
        raise Denied(_unauthorized("no identity: log in, or send a bearer token"))

    # the login flow ------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        request.session["next"] = _local_path(request.query_params.get("next", "/"))
        redirect_uri = str(request.url_for("auth_callback"))
        return await self.oauth.provider.authorize_redirect(request, redirect_uri)

    async def callback(self, request: Request) -> Response:
        try:
            token = await self.oauth.provider.authorize_access_token(request)
        except OAuthError as exc:
            return PlainTextResponse(f"login failed: {exc.error}: {exc.description}", status_code=401)
        claims = dict(token.get("userinfo") or {})
        try:
            # The access token's roles and projects where the provider maps them there only.
            claims = await run_in_threadpool(self.tokens.claims, token["access_token"]) | claims
        except TokenError:
            pass
        try:
            identity = Identity.from_claims(claims, self.config.oidc.claims)
        except (IdentityError, ValueError) as exc:
            return PlainTextResponse(f"login refused: {exc}", status_code=403)
        request.session["identity"] = identity.to_json()
        request.session["expires_at"] = time.time() + self.config.session_max_age_s
        return RedirectResponse(_local_path(request.session.pop("next", "/")), status_code=302)

    async def logout(self, request: Request) -> Response:
        request.session.clear()
        return PlainTextResponse("logged out")

    async def whoami(self, request: Request) -> Response:
        try:
            identity = await self.identity(request)
        except Denied as denied:
            return denied.response
        return JSONResponse(identity.to_json())

    # the proxy -----------------------------------------------------------------------------

    def upstream(self, path: str, identity: Identity) -> str | None:
        """The base URL of the service that answers `path` for this identity."""
        return self.surface(path, identity)[1]

    def surface(self, path: str, identity: Identity) -> tuple[str, str | None]:
        """Which surface answers `path` (dagster, dicomweb, mlflow, metrics) and its base URL."""
        ups = self.config.upstreams
        if self.origin is Origin.VIEWER:
            return "dicomweb", ups.dicomweb
        for prefix, name, base in (("/dicom-web", "dicomweb", ups.dicomweb), ("/mlflow", "mlflow", ups.mlflow),
                                   ("/metrics", "metrics", ups.metrics)):
            if path == prefix or path.startswith(prefix + "/"):
                return name, base
        if not identity.may_launch and ups.dagster_read_only:
            return "dagster", ups.dagster_read_only  # `--read-only`: the UI offers no launch at all
        return "dagster", ups.dagster

    def forwarded_headers(self, request_headers: Mapping[str, str], identity: Identity, client: str,
                          scheme: str, host: str) -> dict[str, str]:
        headers = {k: v for k, v in request_headers.items() if k.lower() not in DROPPED}
        headers[IDENTITY_HEADER] = sign_header(identity, self.config.identity_secret)
        headers["x-forwarded-for"] = client
        headers["x-forwarded-proto"] = scheme
        headers["x-forwarded-host"] = host
        return headers

    async def proxy(self, request: Request) -> Response:
        try:
            identity = await self.identity(request)
        except Denied as denied:
            return denied.response
        surface, base = self.surface(request.url.path, identity)
        if base is None:
            return PlainTextResponse(f"no service behind {request.url.path}", status_code=404)
        is_graphql = request.url.path.rstrip("/") == "/graphql" and self.origin is Origin.PLATFORM
        refusal = None if is_graphql else policy.write_refusal(identity, surface, request.method)
        if refusal:
            return PlainTextResponse(f"refused by the gateway: {refusal}", status_code=403)
        body: bytes | None = None
        allowed: policy.Decision | None = None
        if is_graphql:
            body = await request.body()
            try:
                allowed = self.graphql_decision(identity, request, body)
            except graphql.GraphQLRequestError as exc:
                return JSONResponse({"errors": [{"message": str(exc)}]}, status_code=400)
            if not allowed.allowed:
                return JSONResponse({"errors": [{"message": f"refused by the gateway: {allowed.reason}"}]},
                                    status_code=403)
        assert self.session is not None
        url = base.rstrip("/") + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = self.forwarded_headers(request.headers, identity, request.client.host if request.client else "",
                                         request.url.scheme, request.headers.get("host", ""))
        data: Any = body if body is not None else (None if request.method in ("GET", "HEAD") else request.stream())
        try:
            answer = await self.session.request(request.method, url, headers=headers, data=data,
                                                allow_redirects=False)
        except aiohttp.ClientError as exc:
            return PlainTextResponse(f"the service behind {request.url.path} does not answer: {exc}", status_code=502)
        if allowed is not None and allowed.launches and answer.status == 200:
            self.audit_launches(identity, allowed)
        # Raw headers: several Set-Cookie lines stay several.
        raw_headers = [(k.lower(), v) for k, v in answer.raw_headers if k.decode("latin-1").lower() not in HOP_BY_HOP]
        response: Response
        if answer.content_length is not None and answer.content_length <= BUFFERED_BYTES:
            # A small answer in one piece: cheaper than a stream of chunks.
            try:
                content = await answer.read()
            finally:
                answer.release()
            response = Response(content, status_code=answer.status)
        else:
            response = StreamingResponse(answer.content.iter_any(), status_code=answer.status,
                                         background=BackgroundTask(answer.release))
        response.raw_headers = raw_headers
        return response

    def graphql_decision(self, identity: Identity, request: Request, body: bytes) -> policy.Decision:
        """Every operation of the request (a batch is a list) decided; the first refusal wins."""
        if request.method == "GET":
            documents: list[Any] = [dict(request.query_params)]
            if isinstance(documents[0].get("variables"), str):
                documents[0]["variables"] = json.loads(documents[0]["variables"] or "{}")
        else:
            try:
                parsed = json.loads(body or b"{}")
            except ValueError:
                raise graphql.GraphQLRequestError("the GraphQL request body is not JSON") from None
            documents = parsed if isinstance(parsed, list) else [parsed]
        launches: list[tuple[graphql.Launch, str | None]] = []
        for document in documents:
            if not isinstance(document, Mapping) or not isinstance(document.get("query"), str):
                raise graphql.GraphQLRequestError("a GraphQL request carries a `query` string")
            variables = document.get("variables") if isinstance(document.get("variables"), Mapping) else {}
            op = graphql.operation(document["query"], document.get("operationName"), variables)
            decision = policy.decide(identity, op, self.config.project_of_cohort, self.config.evaluation_assets)
            if not decision.allowed:
                return decision
            launches += decision.launches
        return policy.Decision(True, "allowed", tuple(launches))

    def audit_launches(self, identity: Identity, decision: policy.Decision) -> None:
        if self.config.audit is None:
            return
        for launch, project in decision.launches:
            what = launch.job or ",".join(sorted(launch.asset_roots)) or launch.mutation
            target = f"{what}:{','.join(sorted(launch.partitions))}" if launch.partitions else what
            self.config.audit.record(AuditEvent(identity, Action.RUN_LAUNCH, Via.GATEWAY, target=target,
                                                project=project))

    # websockets (Dagster's GraphQL subscriptions) ------------------------------------------

    async def websocket(self, socket: WebSocket) -> None:
        try:
            identity = await self.identity(socket)
        except Denied:
            await socket.close(code=4401)
            return
        base = self.upstream(socket.url.path, identity)
        if base is None:
            await socket.close(code=4404)
            return
        url = base.replace("http", "ws", 1).rstrip("/") + socket.url.path
        protocols = [p.strip() for p in socket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        headers = {IDENTITY_HEADER: sign_header(identity, self.config.identity_secret)}
        async with websockets.connect(url, subprotocols=protocols or None,  # type: ignore[arg-type]
                                      additional_headers=headers, max_size=None) as upstream:
            await socket.accept(subprotocol=upstream.subprotocol)

            async def to_upstream() -> None:
                while True:
                    message = await socket.receive_text()
                    reason = self._ws_refusal(identity, message)
                    if reason:
                        await socket.close(code=4403, reason=reason[:120])
                        return
                    await upstream.send(message)

            async def to_client() -> None:
                async for message in upstream:
                    await (socket.send_text(message) if isinstance(message, str) else socket.send_bytes(message))

            tasks = [asyncio.create_task(to_upstream()), asyncio.create_task(to_client())]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            except WebSocketDisconnect:
                pass
            finally:
                for task in tasks:
                    task.cancel()

    def _ws_refusal(self, identity: Identity, message: str) -> str | None:
        """A graphql-ws message may carry any operation: its mutations are decided as over HTTP."""
        try:
            data = json.loads(message)
            payload = data.get("payload") if isinstance(data, dict) else None
            if not isinstance(payload, dict) or not isinstance(payload.get("query"), str):
                return None
            op = graphql.operation(payload["query"], payload.get("operationName"), payload.get("variables") or {})
        except (ValueError, graphql.GraphQLRequestError) as exc:
            return str(exc)
        decision = policy.decide(identity, op, self.config.project_of_cohort, self.config.evaluation_assets)
        return None if decision.allowed else decision.reason


def _unauthorized(message: str) -> Response:
    return PlainTextResponse(message, status_code=401, headers={"WWW-Authenticate": 'Bearer realm="kaapana"'})


def _local_path(target: str) -> str:
    """Only a path of this origin: never an open redirect to elsewhere."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


def discover(issuer: str) -> dict[str, Any]:
    """The provider's metadata (its keys, endpoints), read once at start."""
    answer = httpx.get(f"{issuer.rstrip('/')}/.well-known/openid-configuration", timeout=10)
    answer.raise_for_status()
    metadata: dict[str, Any] = answer.json()
    if metadata.get("issuer") != issuer:
        raise ValueError(f"the provider at {issuer} names itself {metadata.get('issuer')!r}")
    return metadata


def create_app(config: GatewayConfig, origin: Origin = Origin.PLATFORM, metadata: Mapping[str, Any] | None = None,
               ) -> Starlette:
    gateway = Gateway(config, origin, metadata if metadata is not None else discover(config.oidc.issuer))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Connections to the services are kept open: the proxy adds no handshake per request.
        # auto_decompress off: the bytes pass through as the service encoded them.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), auto_decompress=False,
                                         timeout=aiohttp.ClientTimeout(total=None, connect=10)) as session:
            gateway.session = session
            if config.audit is None:
                yield
            else:
                with config.audit.running():  # appends what is left at shutdown
                    yield

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    routes = [
        Route(f"{AUTH_ROOT}/login", gateway.login, methods=["GET"]),
        Route(f"{AUTH_ROOT}/callback", gateway.callback, methods=["GET"], name="auth_callback"),
        Route(f"{AUTH_ROOT}/logout", gateway.logout, methods=["GET", "POST"]),
        Route(f"{AUTH_ROOT}/whoami", gateway.whoami, methods=["GET"]),
        WebSocketRoute("/{path:path}", gateway.websocket),
        Route("/{path:path}", gateway.proxy, methods=methods),
    ]
    middleware = [Middleware(SessionMiddleware, secret_key=config.session_secret, session_cookie=SESSION_COOKIE,
                             max_age=config.session_max_age_s, same_site="lax", https_only=config.https_only)]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.gateway = gateway
    return app
