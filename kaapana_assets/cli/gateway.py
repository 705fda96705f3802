"""`kaapana gateway`: one OpenID Connect login in front of the Dagster webserver, the DICOMweb
service and viewer, MLflow's UI and the exporter (docs/access.md). Secrets are read from files
(Kubernetes mounts its Secrets as files), never from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from kaapana_assets.cli.common import SubParsers, console, home_of


def _secret(path: str, what: str) -> str:
    text = Path(path).read_text().strip()
    if len(text) < 16:
        raise SystemExit(f"{what} in {path}: at least 16 characters")
    return text


def cmd_gateway(args: argparse.Namespace) -> int:
    import asyncio

    import uvicorn

    from kaapana_assets.access.audit import AuditLog
    from kaapana_assets.access.identity import ClaimNames
    from kaapana_assets.environment import Environment
    from kaapana_assets.gateway.app import Origin, create_app, discover
    from kaapana_assets.gateway.config import GatewayConfig, OidcSettings, Upstreams
    from kaapana_assets.gateway.policy import CohortProjects
    from kaapana_assets.lake import Lake

    home = home_of(args).ensure()
    environment = Environment.read(home=home.root)
    lake = Lake.of(environment)
    claims = ClaimNames(roles=tuple(args.roles_claim or ClaimNames.roles),
                        projects=tuple(args.projects_claim or ClaimNames.projects))
    oidc = OidcSettings(args.issuer, args.client_id, _secret(args.client_secret_file, "the client secret"),
                        args.audience or args.client_id, args.scope, claims, args.leeway)
    config = GatewayConfig(
        oidc, Upstreams(args.dagster, args.dagster_read_only, args.dicomweb, args.mlflow, args.metrics),
        session_secret=_secret(args.session_secret_file, "the session secret"),
        identity_secret=_secret(args.identity_secret_file, "the identity secret").encode(),
        audit=AuditLog(lake), project_of_cohort=CohortProjects(Path(args.cohorts or environment.cohorts or home.root / 'cohorts')),
        https_only=args.https_only)
    metadata = discover(args.issuer)
    servers = [uvicorn.Server(uvicorn.Config(create_app(config, Origin.PLATFORM, metadata), host=args.host,
                                             port=args.port, log_level="warning", access_log=False, proxy_headers=True))]
    if args.viewer_port:
        servers.append(uvicorn.Server(uvicorn.Config(create_app(config, Origin.VIEWER, metadata), host=args.host,
                                                     port=args.viewer_port, log_level="warning", access_log=False,
                                                     proxy_headers=True)))
    console.print(f"gateway on http://{args.host}:{args.port} (login at {args.issuer})"
                  + (f"; viewer on http://{args.host}:{args.viewer_port}" if args.viewer_port else ""))

    async def serve() -> None:
        await asyncio.gather(*(server.serve() for server in servers))

    asyncio.run(serve())
    return 0


def add_parsers(sub: SubParsers) -> None:
    p = sub.add_parser(
        "gateway", help="one OpenID Connect login in front of every web surface (Dagster, DICOMweb, MLflow, metrics)",
        description="Serve the platform's web surfaces behind one login: OpenID Connect against the identity "
                    "provider (Keycloak or any), sessions in signed cookies, bearer tokens for scripts. The "
                    "services listen on loopback; the gateway passes each request's identity in a signed "
                    "header. See docs/access.md.",
    )
    p.add_argument("--home", default=None, help="default: $KAAPANA_HOME (its lake holds the audit table)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--viewer-port", type=int, default=None, help="a second listener for the OHIF viewer's origin")
    p.add_argument("--issuer", required=True, help="the provider's issuer URL (Keycloak: https://HOST/realms/REALM)")
    p.add_argument("--client-id", required=True)
    p.add_argument("--client-secret-file", required=True)
    p.add_argument("--audience", default=None, help="the `aud` bearer tokens carry (default: the client id)")
    p.add_argument("--scope", default="openid profile", help="scopes the login asks for (default: %(default)s)")
    p.add_argument("--roles-claim", action="append", default=None,
                   help="dotted path of the roles claim, repeatable, first present wins "
                        "(default: realm_access.roles, roles)")
    p.add_argument("--projects-claim", action="append", default=None, help="(default: projects)")
    p.add_argument("--leeway", type=int, default=0, help="seconds of clock skew tolerated on expiry")
    p.add_argument("--session-secret-file", required=True, help="signs the session cookies")
    p.add_argument("--identity-secret-file", required=True,
                   help="signs the identity header; the DICOMweb service is given the same file")
    p.add_argument("--dagster", required=True, help="the Dagster webserver's URL (loopback)")
    p.add_argument("--dagster-read-only", default=None, help="a `--read-only` webserver for users who may not launch")
    p.add_argument("--dicomweb", default=None, help="the DICOMweb service's URL (it serves the viewer too)")
    p.add_argument("--mlflow", default=None, help="MLflow's UI, started with --static-prefix /mlflow")
    p.add_argument("--metrics", default=None, help="the exporter's URL")
    p.add_argument("--cohorts", default=None, help="the cohort definitions folder (a cohort's project); default: $KAAPANA_COHORTS")
    p.add_argument("--https-only", action="store_true", help="mark the session cookie Secure (behind TLS)")
    p.set_defaults(func=cmd_gateway)
