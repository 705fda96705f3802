"""Site keys: each site signs what it sends with its own 256-bit key (see channel.py).
Kept apart from the channel so that reading the federation file needs neither Flower nor
torch (the code location imports it for every run)."""

from __future__ import annotations

import base64
import secrets

__all__ = ["InvalidSiteKey", "generate_site_key", "validate_site_key"]


class InvalidSiteKey(ValueError):
    """A configured site key that is not 32 bytes of base64: a configuration error, never
    to be confused with a tampered update."""


def generate_site_key() -> str:
    """A new 256-bit site key, base64 (give each site its own; store it as a secret)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def validate_site_key(key: str, site: str) -> str:
    """`key` if it is a usable 256-bit key; else InvalidSiteKey naming the site."""
    try:
        raw = base64.b64decode(key, validate=True)
    except (ValueError, TypeError) as exc:
        raise InvalidSiteKey(f"the key of site {site!r} is not base64 ({exc}); "
                             "make one with `kaapana federation key`") from None
    if len(raw) != 32:
        raise InvalidSiteKey(f"the key of site {site!r} is {len(raw)} bytes; a site key is 32 bytes, "
                             "base64-encoded (`kaapana federation key`)")
    return key
