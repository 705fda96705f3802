"""What the gateway serves and trusts, passed down from the process that starts it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kaapana_assets.access.audit import AuditLog
from kaapana_assets.access.identity import ClaimNames

SCOPE = "openid profile"
# What the gateway answers itself: the login flow.
AUTH_ROOT = "/auth"


@dataclass(frozen=True)
class Upstreams:
    """The services behind the gateway, each on loopback (or a pod-local address): base URLs."""

    dagster: str  # the webserver: "/" and "/graphql" (its websocket too)
    dagster_read_only: str | None = None  # `dagster-webserver --read-only`, for users who may not launch
    # "/dicom-web" on the main origin; the OHIF viewer on the viewer origin (the gateway's second
    # listener, `--viewer-port`), whose root is the DICOMweb service's: OHIF's published build
    # loads its files from "/", where the main origin serves Dagster.
    dicomweb: str | None = None
    mlflow: str | None = None  # "/mlflow" (MLflow's UI started with --static-prefix /mlflow)
    metrics: str | None = None  # "/metrics", the exporter


@dataclass(frozen=True)
class OidcSettings:
    issuer: str  # the provider's issuer URL (its /.well-known/openid-configuration is read at start)
    client_id: str
    client_secret: str
    audience: str  # the `aud` a bearer token must carry (Keycloak: the client id, or an audience mapper's)
    scope: str = SCOPE  # what the login asks for (add the scope that maps roles and projects)
    claims: ClaimNames = field(default_factory=ClaimNames)
    leeway_s: int = 0  # clock skew tolerated on `exp`/`iat`


@dataclass(frozen=True)
class GatewayConfig:
    oidc: OidcSettings
    upstreams: Upstreams
    session_secret: str  # signs the session cookie
    identity_secret: bytes  # signs the identity header the services read (shared with them)
    session_max_age_s: int = 8 * 3600
    # A scientist may launch runs of these only: assets (by their key's first part) or jobs.
    evaluation_assets: frozenset[str] = frozenset({"segmentation_evaluation", "site_evaluation", "evaluate_model"})
    audit: AuditLog | None = None
    # A cohort partition's project (policy.CohortProjects reads the definitions' `project:`).
    project_of_cohort: Callable[[str], str | None] = lambda cohort: None
    https_only: bool = False  # the session cookie's Secure flag (behind TLS)
