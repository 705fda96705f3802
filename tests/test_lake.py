"""Delta helpers: idempotent MERGEs, no duplicate keys, exact time travel."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import QUARANTINE, STUDIES


def _quarantine_rows(*shas: str) -> pa.Table:
    return pa.Table.from_pylist(
        [{"sha256": s, "reason": "not_dicom", "error": "x", "size_bytes": 1} for s in shas], schema=QUARANTINE.schema
    )


def test_merge_is_idempotent_and_deduplicates(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    assert lake.version("quarantine") is None and lake.read("quarantine").height == 0
    first = lake.merge("quarantine", _quarantine_rows("a", "b", "a"))
    assert first.inserted == 2 and lake.read("quarantine").height == 2
    again = lake.merge("quarantine", _quarantine_rows("a", "b"))
    assert again.inserted == 0 and again.version == first.version


def test_mutable_rows_update_only_when_changed(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")

    def rows(count: int) -> pa.Table:
        return pa.Table.from_pylist(
            [{"study_uid": "1.2", "series_count": count, "row_digest": f"d{count}"}], schema=STUDIES.schema
        )

    v1 = lake.merge("studies", rows(1)).version
    same = lake.merge("studies", rows(1))
    assert same.version == v1 and same.updated == 0
    changed = lake.merge("studies", rows(2))
    assert changed.updated == 1 and changed.version == v1 + 1  # type: ignore[operator]
    # Time travel: the old version still reads as it was.
    assert lake.read("studies", version=v1)["series_count"].to_list() == [1]
    assert lake.read("studies")["series_count"].to_list() == [2]
