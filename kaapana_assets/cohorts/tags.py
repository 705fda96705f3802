"""Series tags (Kaapana's curation tags), stored in the `tags` Delta table."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pyarrow as pa

from kaapana_assets.cohorts.definitions import validate_tag
from kaapana_assets.dicom.uids import require_uid
from kaapana_assets.lake import Lake, WriteResult
from kaapana_assets.lake.schemas import SERIES, TAGS


def add_tag(lake: Lake, tag: str, series_uids: list[str]) -> WriteResult:
    validate_tag(tag)
    uids = [require_uid(u, "SeriesInstanceUID") for u in series_uids]
    known = set(lake.read(SERIES, pl.col("series_uid").is_in(uids))["series_uid"].to_list())
    unknown = sorted(set(uids) - known)
    if unknown:
        raise KeyError(f"not in the index: {unknown[:5]}{' …' if len(unknown) > 5 else ''}")
    now = dt.datetime.now(dt.timezone.utc)
    rows = pa.Table.from_pylist([{"series_uid": u, "tag": tag, "tagged_at": now} for u in uids], schema=TAGS.schema)
    return lake.merge(TAGS, rows)


def remove_tag(lake: Lake, tag: str, series_uids: list[str]) -> WriteResult:
    validate_tag(tag)
    uids = [require_uid(u, "SeriesInstanceUID") for u in series_uids]
    if not lake.exists(TAGS) or not uids:
        return WriteResult(TAGS.name, lake.version(TAGS))
    # Safe to inline: tags and UIDs were validated against strict grammars above.
    listed = ", ".join(f"'{u}'" for u in uids)
    return lake.delete(TAGS, f"tag = '{tag}' AND series_uid IN ({listed})")


def tags_of(lake: Lake, series_uid: str) -> list[str]:
    return sorted(lake.read(TAGS, pl.col("series_uid") == series_uid)["tag"].to_list())
