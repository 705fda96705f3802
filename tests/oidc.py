"""The gateway's site for tests/gateway (and the client's project test): the OpenID Connect
provider (bench/oidc_provider.py), skipped with the command to run when it is not installed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.oidc_provider import (  # noqa: F401 (the names the tests use, from one place)
    ADMIN,
    AUDIENCE,
    CLIENT_ID,
    CLIENT_SECRET,
    MANAGER_A,
    PROJECT_A,
    PROJECT_B,
    PROVIDER_MODULES,
    SCIENTIST_A,
    SCOPE,
    SHORT_CLIENT_ID,
    VIEWER_A,
    OidcProvider,
    Tokens,
    log_in,
)
from bench.oidc_provider import running_provider as _running_provider
from tests.tools import require

LAUNCH = """mutation Launch($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) { __typename ... on LaunchRunSuccess { run { runId } } }
}"""


@contextmanager
def running_provider() -> Iterator[OidcProvider]:
    require("node")
    if not (PROVIDER_MODULES / "oidc-provider").is_dir():
        pytest.skip(f"oidc-provider is not installed in {PROVIDER_MODULES.parent}: run `make oidc-provider` "
                    "(`make test-all` does, before the tests)")
    with _running_provider() as provider:
        yield provider


# -- the gateway's site: provider, two projects' studies, DICOMweb and gateway (tests/gateway) --

COHORT_A, COHORT_B = "cohort-a", "cohort-b"  # a cohort definition of each project


@dataclass
class GatewaySite:
    """The OIDC provider, a home with a study of project A and one of project B (series assigned
    by MERGEing `series_projects` rows), `kaapana dicomweb` behind `kaapana gateway` (platform and
    viewer origins), and the loopback port where the gateway expects the Dagster webserver (the
    tests that need one start it there: it costs seconds the others do not pay)."""

    provider: OidcProvider
    home: Path
    study_a: str
    study_b: str
    series_a: list[str]
    series_b: list[str]
    dicomweb_url: str  # direct, without the gateway (answers 401 to everyone)
    gateway_url: str
    viewer_url: str
    dagster_port: int
    dagster_read_only_port: int  # `--read-only`, where the gateway sends those who may not launch
    cohorts: Path
    identity_secret: bytes
    _tokens: dict[tuple[str, str], Tokens]

    def tokens(self, user: str, client_id: str = CLIENT_ID) -> Tokens:
        if client_id == SHORT_CLIENT_ID:
            return self.provider.tokens(user, client_id)  # never cached: it expires at once
        key = (user, client_id)
        if key not in self._tokens:
            self._tokens[key] = self.provider.tokens(user, client_id)
        return self._tokens[key]

    def bearer(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens(user).access_token}"}


def cohort_yaml(name: str, project: str) -> str:
    return f"name: {name}\nproject: {project}\ndescription: every CT of {project}\npurpose: training\nfilter:\n  modality: CT\n"
