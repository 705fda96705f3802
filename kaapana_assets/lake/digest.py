"""The row digest that MERGEs compare: content only, never a timestamp, so a re-run that
changes nothing (a re-sent SEG, a recomputed series, a resumed round) commits nothing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

# Columns that record when a row was written, not what it says.
TIME_COLUMNS = frozenset({"row_digest", "updated_at", "committed_at", "sent_at", "ingested_at", "quarantined_at",
                          "seen_at", "checked_at", "trained_at"})


def row_digest(row: Mapping[str, object]) -> str:
    content = {k: v for k, v in row.items() if k not in TIME_COLUMNS}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
