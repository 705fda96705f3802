"""One row digest for every mutable table: content only, so an unchanged re-run commits nothing."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from kaapana_assets.lake import Lake
from kaapana_assets.lake.digest import row_digest
from kaapana_assets.network.sender import DicomNode, SendOutcome, record_sent


def test_digest_ignores_write_times() -> None:
    row = {"a": 1, "b": [1.0, 2.0], "updated_at": dt.datetime.now(dt.timezone.utc)}
    assert row_digest(row) == row_digest({**row, "updated_at": dt.datetime(2000, 1, 1), "sent_at": 5})
    assert row_digest(row) != row_digest({**row, "a": 2})


def test_an_unchanged_resend_rewrites_nothing(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    node = DicomNode("PACS", "127.0.0.1", 104)
    outcome = SendOutcome(path="x.dcm", sop_instance_uid="1.2.3", study_uid="1.2", series_uid="1.2.4",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4", status="success", dimse_status=0, attempts=1)
    first = record_sent(lake, [outcome], node)
    time.sleep(0.01)
    assert record_sent(lake, [outcome], node) == first  # same content, later sent_at: no new version
    outcome.status, outcome.error = "failed", "refused with status 0xA700"
    assert record_sent(lake, [outcome], node) == first + 1  # type: ignore[operator]
