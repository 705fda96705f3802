"""DICOM UID grammar (PS3.5 §9.1). Every path built from a DICOM value goes through here:
DICOM files are untrusted input, and a UID like `../../etc` must never become a path."""

from __future__ import annotations

import re
import uuid

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
MAX_UID_LENGTH = 64


class InvalidUID(ValueError):
    pass


def is_valid_uid(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_UID_LENGTH
        and _UID.fullmatch(value) is not None
    )


def require_uid(value: object, keyword: str) -> str:
    """Return `value` if it is a valid UID, else raise `InvalidUID` naming the attribute."""
    if not is_valid_uid(value):
        shown = repr(value)[:80]
        raise InvalidUID(f"{keyword} {shown} is not a valid DICOM UID (digits and dots, ≤64 chars)")
    return value  # type: ignore[return-value]


# Namespace of the platform's name-based UIDs (uuid5): fixed, so the same inputs give the
# same UID on every site and every run.
UID_NAMESPACE = uuid.UUID("5b0c6c1e-7a43-5d0e-9f5e-6b61617061e1")


def deterministic_uid(*parts: object) -> str:
    """A UUID-derived UID (PS3.5 B.2: '2.25.' + the UUID as an integer) named by `parts`,
    via highdicom: segmenting a series again with the same model, or generating the same
    synthetic study, gives the same UIDs."""
    import highdicom as hd  # here: the ingest workers import this module and stay light

    return str(hd.UID.from_uuid(str(uuid.uuid5(UID_NAMESPACE, "\x1f".join(str(p) for p in parts)))))
