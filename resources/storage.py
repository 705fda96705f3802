"""Storage resources. Local values live under KAAPANA_HOME; production swaps URIs only."""


from pathlib import Path

import dagster as dg
from pydantic import Field

from kaapana_assets.archive.service import Archive
from kaapana_assets.home import KaapanaHome
from kaapana_assets.lake import Lake


class LakeResource(dg.ConfigurableResource):
    """The Delta lake: a folder locally, an object-store URI (s3://…) in production."""

    uri: str = Field(description="Root of the Delta tables, e.g. /data/kaapana/lake or s3://bucket/lake")
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="deltalake storage options (endpoint, region) for object stores"
    )
    access_key_id: str = Field(default="", description="AWS_ACCESS_KEY_ID of the object store")
    secret_access_key: str = Field(default="", description="AWS_SECRET_ACCESS_KEY of the object store")
    unsafe_store_allowed: bool = Field(
        default=False, description="KAAPANA_LAKE_UNSAFE_STORE=allow: write even where the store ignores conditional "
        "writes (one writer only)")

    def lake(self) -> Lake:
        options = dict(self.storage_options)
        if self.access_key_id:
            options["AWS_ACCESS_KEY_ID"] = self.access_key_id
        if self.secret_access_key:
            options["AWS_SECRET_ACCESS_KEY"] = self.secret_access_key
        return Lake(self.uri, options or None, self.unsafe_store_allowed)


class ArchiveResource(dg.ConfigurableResource):
    """The DICOM archive (PACS role), the incoming spool and the quarantine folder."""

    home: str = Field(description="KAAPANA_HOME: archive/, incoming/, quarantine/ and previews/ live here")
    quiet_period_s: float = Field(
        default=10.0, description="A study counts as complete once its spool files are unchanged this long"
    )
    early_start: bool = Field(
        default=True,
        description="Start a new study's run when its first files arrive; the run waits for the quiet period "
        "itself, so its start-up (and the predictor's imports) overlaps it. Off: the run is requested once the "
        "study is quiet",
    )
    ingest_workers: int = Field(default=2, description="Processes that parse headers in parallel")
    site: str = Field(default="", description="This site's name in statistics; empty: 'local'")

    def site_name(self) -> str:
        return self.site or "local"

    def kaapana_home(self) -> KaapanaHome:
        return KaapanaHome(Path(self.home))

    @property
    def spool(self) -> Path:
        return self.kaapana_home().incoming

    def open(self, lake: Lake) -> Archive:
        """This home's archive, indexed in `lake`."""
        home = self.kaapana_home().ensure()
        return Archive(lake=lake, root=home.archive, quarantine=home.quarantine)
