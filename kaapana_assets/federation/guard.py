"""The guard on what leaves a site: no patient name or ID, no study, series or SOP UID of
the site's data may appear in anything it sends; and no count below the small-cell
threshold, which a site may raise for itself (its floor, node config `min-cell-size`)."""

from __future__ import annotations

from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES

MIN_LENGTH = 4  # shorter values (e.g. sex "M") would match anywhere by chance
DEFAULT_THRESHOLD = 5  # small cells: counts from 1 to threshold-1 never leave a site in the clear
MAX_THRESHOLD = 1000


def small_cell_marker(threshold: int) -> str:
    """What a site publishes instead of a count below the small-cell threshold: "<5"."""
    return f"<{threshold}"


def site_identifiers(lake: Lake) -> set[str]:
    instances = lake.read(INSTANCES)
    values: set[str] = set()
    for column in ("patient_id", "patient_name", "study_uid", "series_uid", "sop_instance_uid", "accession_number"):
        if column in instances.columns:
            values |= {v for v in instances[column].drop_nulls().unique().to_list() if len(v) >= MIN_LENGTH}
    return values


def leaked_identifiers(data: bytes, identifiers: set[str]) -> list[str]:
    """Identifiers found in `data` (as UTF-8 or Latin-1 bytes)."""
    found = []
    for value in identifiers:
        if value.encode("utf-8") in data or value.encode("latin-1", "ignore") in data:
            found.append(value)
    return sorted(found)


class IdentifierLeak(RuntimeError):
    pass


def assert_nothing_identifying(data: bytes, lake: Lake) -> None:
    leaked = leaked_identifiers(data, site_identifiers(lake))
    if leaked:
        raise IdentifierLeak(f"refusing to send: {len(leaked)} identifier(s) of this site's data in the payload")


__all__ = ["DEFAULT_THRESHOLD", "MAX_THRESHOLD", "IdentifierLeak", "assert_nothing_identifying", "leaked_identifiers",
           "site_identifiers"]
