"""Bearer tokens: JWTs validated against the provider's published keys (JWKS), issuer,
audience and expiry, with joserfc (authlib's JOSE)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import httpx
from joserfc import errors, jwt
from joserfc.jwk import KeySet

# Asymmetric signatures only: a token signed with "none" or an HMAC over a public key is refused.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")

REFRESH_S = 60.0
CACHED_TOKENS = 4096


class TokenError(ValueError):
    """A token that is not a valid, current token of this provider for this audience."""


class TokenValidator:
    def __init__(self, issuer: str, audience: str, jwks_uri: str, leeway_s: int = 0,
                 fetch: Callable[[str], dict[str, Any]] | None = None) -> None:
        self.issuer, self.audience, self.jwks_uri, self.leeway_s = issuer, audience, jwks_uri, leeway_s
        self._fetch = fetch or (lambda url: httpx.get(url, timeout=10).raise_for_status().json())
        self._lock = threading.Lock()
        self._keys: KeySet | None = None
        self._refreshed_at = float("-inf")
        # Tokens already validated → their claims: a script's next request skips the signature
        # check; expiry is still checked every time.
        self._valid: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def _may_refresh(self) -> bool:
        """At most one re-read of the keys per REFRESH_S: tokens with made-up key ids cannot
        make the gateway hammer the provider."""
        now = time.monotonic()
        with self._lock:
            if now - self._refreshed_at < REFRESH_S:
                return False
            self._refreshed_at = now
            return True

    def _key_set(self, refresh: bool = False) -> KeySet:
        with self._lock:
            if self._keys is None or refresh:
                self._keys = KeySet.import_key_set(self._fetch(self.jwks_uri))  # type: ignore[arg-type]
            return self._keys

    def cached(self, token: str) -> dict[str, Any] | None:
        """The claims of a token validated before and not expired since; None otherwise."""
        with self._lock:
            claims = self._valid.get(token)
            if claims is None:
                return None
            if float(claims["exp"]) + self.leeway_s <= time.time():
                del self._valid[token]
                return None
            self._valid.move_to_end(token)
            return claims

    def claims(self, token: str) -> dict[str, Any]:
        """The claims of a valid token; TokenError naming what is wrong otherwise. An unknown key
        id re-reads the provider's keys once (a rotated key)."""
        cached = self.cached(token)
        if cached is not None:
            return cached
        try:
            try:
                decoded = jwt.decode(token, self._key_set(), algorithms=ALGORITHMS)
            except (errors.MissingKeyError, errors.InvalidKeyIdError):
                if not self._may_refresh():
                    raise
                decoded = jwt.decode(token, self._key_set(refresh=True), algorithms=ALGORITHMS)
            jwt.JWTClaimsRegistry(
                leeway=self.leeway_s,
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.audience},
                exp={"essential": True},
            ).validate(decoded.claims)
        except errors.JoseError as exc:
            raise TokenError(f"{type(exc).__name__}: {exc}") from None
        except ValueError as exc:
            raise TokenError(f"not a JWT: {exc}") from None
        claims = dict(decoded.claims)
        with self._lock:
            self._valid[token] = claims
            while len(self._valid) > CACHED_TOKENS:
                self._valid.popitem(last=False)
        return claims
