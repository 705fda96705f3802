"""Where a site keeps its data: one KAAPANA_HOME holds lake, archive, spool and quarantine.

Production swaps the URIs (S3 lake, external PACS), not the code; this layout is the
embedded default used by the demo, tests and a single-node install.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KaapanaHome:
    root: Path

    @property
    def lake(self) -> Path:
        return self.root / "lake"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    @property
    def incoming(self) -> Path:
        """The spool that the DICOM receiver and manual copies fill."""
        return self.root / "incoming"

    @property
    def receive_journal(self) -> Path:
        """The receive journal of `incoming`: beside the spool, never in it, so that ingesting
        the spool folder reads nothing of the receiver's (`network/journal.py` `journal_folder`)."""
        return self.root / "incoming-journal"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def previews(self) -> Path:
        return self.root / "previews"

    @property
    def hub_federation(self) -> Path:
        """The hub's federation folder (what it published, received, and its runs' results)."""
        return self.root / "federation" / "hub"

    @property
    def site_federation(self) -> Path:
        """This site's federation folder (what the hub sent it, what it sends back): apart
        from the hub's, since one home may be both (the demo's first site)."""
        return self.root / "federation" / "site"

    def ensure(self) -> "KaapanaHome":
        for path in (self.lake, self.archive, self.incoming, self.quarantine, self.previews):
            path.mkdir(parents=True, exist_ok=True)
        return self
