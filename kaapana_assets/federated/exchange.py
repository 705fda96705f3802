"""Sealed update envelopes: AES-256-GCM with the sending site's own key.

An envelope is one JSON manifest line (experiment, round, site, case count, sha256 of the
payload, nonce) followed by the ciphertext. The manifest is the AEAD's associated data,
so it cannot be edited without the key. The hub opens an update with the key of the site
it expects and checks experiment and round, which rejects:
  - tampered bytes or an edited manifest (authentication fails),
  - a foreign update (sealed with another site's key),
  - a replay of an older round or another experiment, and a file claiming another site.
Unlike one token shared by all (Kaapana's weak point), a leaked key exposes one site only.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12


class RejectionReason(StrEnum):
    """Why a site's update, fingerprint or evaluation was not used (the rounds table's `reason`)."""

    MISSING = "missing"
    MALFORMED = "malformed"
    WRONG_SITE = "wrong_site"
    REPLAYED = "replayed"
    UNAUTHENTIC = "unauthentic"  # authentication failed: tampered, or another site's key
    DIGEST_MISMATCH = "digest_mismatch"
    BAD_PAYLOAD = "bad_payload"
    SITE_FAILED = "site_failed"


class UpdateRejected(ValueError):
    def __init__(self, reason: RejectionReason, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass(frozen=True)
class Manifest:
    experiment: str
    round: int
    site: str
    cases: int
    sha256: str
    nonce: str
    created_at: str

    def associated_data(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()


def generate_site_key() -> str:
    """A new 256-bit site key, base64 (give each site its own; store it as a secret)."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()


class InvalidSiteKey(ValueError):
    """A configured site key that is not 32 bytes of base64: a configuration error, never
    to be confused with a tampered update."""


def validate_site_key(key: str, site: str) -> str:
    """`key` if it is a usable AES-256 key; else InvalidSiteKey naming the site."""
    try:
        raw = base64.b64decode(key, validate=True)
    except (ValueError, TypeError) as exc:
        raise InvalidSiteKey(f"the key of site {site!r} is not base64 ({exc}); "
                             "make one with `kaapana federation key`") from None
    if len(raw) != 32:
        raise InvalidSiteKey(f"the key of site {site!r} is {len(raw)} bytes; an AES-256 site key is 32 bytes, "
                             "base64-encoded (`kaapana federation key`)")
    return key


def _key(key: str) -> AESGCM:
    return AESGCM(base64.b64decode(validate_site_key(key, "?")))


def seal(payload: bytes, key: str, experiment: str, round_: int, site: str, cases: int) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    manifest = Manifest(experiment, int(round_), site, int(cases), hashlib.sha256(payload).hexdigest(),
                        base64.b64encode(nonce).decode(), dt.datetime.now(dt.timezone.utc).isoformat())
    ciphertext = _key(key).encrypt(nonce, payload, manifest.associated_data())
    return manifest.associated_data() + b"\n" + ciphertext


def read_manifest(envelope: bytes) -> Manifest:
    head, sep, _ = envelope.partition(b"\n")
    if not sep:
        raise UpdateRejected(RejectionReason.MALFORMED, "no manifest line")
    try:
        return Manifest(**json.loads(head))
    except (ValueError, TypeError) as exc:
        raise UpdateRejected(RejectionReason.MALFORMED, f"unreadable manifest: {exc}") from None


def open_sealed(envelope: bytes, key: str, experiment: str, round_: int, site: str) -> tuple[Manifest, bytes]:
    """The verified manifest and payload, or UpdateRejected with the reason."""
    manifest = read_manifest(envelope)
    _, _, ciphertext = envelope.partition(b"\n")
    if manifest.site != site:
        raise UpdateRejected(RejectionReason.WRONG_SITE, f"update claims site {manifest.site!r}, expected {site!r}")
    if manifest.experiment != experiment or manifest.round != int(round_):
        raise UpdateRejected(
            RejectionReason.REPLAYED, f"update is for {manifest.experiment} round {manifest.round}, expected {experiment} round {round_}"
        )
    cipher = AESGCM(base64.b64decode(validate_site_key(key, site)))  # a bad key raises InvalidSiteKey
    try:
        nonce = base64.b64decode(manifest.nonce, validate=True)
        payload = cipher.decrypt(nonce, ciphertext, manifest.associated_data())
    except (InvalidTag, ValueError):
        raise UpdateRejected(
            RejectionReason.UNAUTHENTIC, f"update of {site} failed authentication: tampered, or not sealed with {site}'s key"
        ) from None
    if hashlib.sha256(payload).hexdigest() != manifest.sha256:
        raise UpdateRejected(RejectionReason.DIGEST_MISMATCH, "payload digest does not match its manifest")
    return manifest, payload
