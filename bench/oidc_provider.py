"""The OpenID Connect provider of the gateway's tests and benchmark: panva's oidc-provider under
Node (tests/gateway/oidc/provider.mjs, installed by `make oidc-provider` into build/oidc-provider),
on a free loopback port, and its development login form driven over HTTP."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

REPO = Path(__file__).resolve().parents[1]

PROVIDER_SCRIPT = REPO / "tests" / "gateway" / "oidc" / "provider.mjs"
PROVIDER_MODULES = REPO / "build" / "oidc-provider" / "node_modules"
CLIENT_ID = "kaapana"
SHORT_CLIENT_ID = "kaapana-short"  # its tokens expire one second after they are issued
CLIENT_SECRET = "kaapana-test-secret"
AUDIENCE = "urn:kaapana:platform"  # the access tokens' `aud`
SCOPE = "openid profile kaapana"
# The provider's users (provider.mjs): projects proj-a and proj-b.
ADMIN, MANAGER_A, SCIENTIST_A, VIEWER_A = "admin", "manager-a", "scientist-a", "viewer-a"
PROJECT_A, PROJECT_B = "proj-a", "proj-b"
# Where a script's code flow "returns": a loopback redirect URI on any port (RFC 8252), never visited.
SCRIPT_REDIRECT = "http://127.0.0.1:9/auth/callback"


@dataclass(frozen=True)
class Tokens:
    access_token: str
    id_token: str


@dataclass
class OidcProvider:
    issuer: str
    process: subprocess.Popen

    def tokens(self, user: str, client_id: str = CLIENT_ID) -> Tokens:
        """The user's tokens by the authorization code flow, as a script gets them."""
        with httpx.Client(base_url=self.issuer) as browser:
            response = browser.get("/auth", params={
                "client_id": client_id, "response_type": "code", "scope": SCOPE,
                "redirect_uri": SCRIPT_REDIRECT, "state": "state", "nonce": "nonce"})
            location = log_in(browser, response, user, self.issuer)
        code = parse_qs(urlsplit(location).query)["code"][0]
        answer = httpx.post(f"{self.issuer}/token", auth=(client_id, CLIENT_SECRET), data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": SCRIPT_REDIRECT})
        answer.raise_for_status()
        return Tokens(answer.json()["access_token"], answer.json()["id_token"])


def log_in(browser: httpx.Client, response: httpx.Response, user: str, issuer: str) -> str:
    """Follow `response` through the provider's login form as `user` (any password); the first
    redirect that leaves the provider, where the browser would go next."""
    while True:
        if response.is_redirect:
            location = str(response.next_request.url) if response.next_request else response.headers["location"]
            if not location.startswith(issuer):
                return location
            response = browser.get(location)
        elif response.status_code == 200 and 'name="login"' in response.text:
            action = re.search(r'<form[^>]*action="([^"]+)"', response.text)
            assert action, response.text[:500]
            response = browser.post(action.group(1), data={"prompt": "login", "login": user, "password": "any"})
        else:
            raise AssertionError(f"the provider answered {response.status_code}: {response.text[:500]}")


@contextmanager
def running_provider() -> Iterator[OidcProvider]:
    """The provider on a free loopback port until the block ends (stopped by its process group)."""
    if not (PROVIDER_MODULES / "oidc-provider").is_dir():
        raise FileNotFoundError(f"oidc-provider is not installed in {PROVIDER_MODULES.parent}: run `make oidc-provider`")
    process = subprocess.Popen(["node", str(PROVIDER_SCRIPT), str(PROVIDER_MODULES), CLIENT_SECRET],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        line = process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"oidc-provider did not start (exit code {process.poll()})")
        yield OidcProvider(json.loads(line)["issuer"], process)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


