"""DICOM UID grammar (PS3.5 §9.1). Every path built from a DICOM value goes through here:
DICOM files are untrusted input, and a UID like `../../etc` must never become a path."""

from __future__ import annotations

import re

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
