"""Storage resources. Local defaults live under KAAPANA_HOME; production swaps URIs only."""


import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import IngestTargets
from kaapana_assets.lake import Lake
from resources.cohorts import CohortDefinitionsResource
from resources.dicom_node import DicomNodeResource
from resources.extensions import ExtensionRunner
from resources.federation import FederatedSiteResource, FederationResource
from resources.mlflow import MlflowResource
from resources.nnunet import NnunetResource


class LakeResource(dg.ConfigurableResource):
    """The Delta lake: a folder locally, an object-store URI (s3://…) in production."""

    uri: str = Field(
        default="",
        description="Root of the Delta tables, e.g. /data/kaapana/lake or s3://bucket/lake; "
        "empty: $KAAPANA_HOME/lake, resolved when a run starts",
    )
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="deltalake storage options (credentials, endpoint) for object stores"
    )

    def lake(self) -> Lake:
        return Lake(self.uri or KaapanaHome.from_env().lake, self.storage_options or None)


class ArchiveResource(dg.ConfigurableResource):
    """The DICOM archive (PACS role), the incoming spool and the quarantine folder."""

    home: str = Field(
        default="",
        description="KAAPANA_HOME: archive/, incoming/, quarantine/ and previews/ live here; "
        "empty: $KAAPANA_HOME (default ./.kaapana), resolved when a run starts",
    )
    quiet_period_s: float = Field(
        default=10.0, description="A study counts as complete once its spool files are unchanged this long"
    )
    ingest_workers: int = Field(default=2, description="Processes that parse headers in parallel")
    site: str = Field(default="", description="This site's name in statistics; empty: $KAAPANA_SITE or 'local'")

    def site_name(self) -> str:
        return self.site or os.environ.get("KAAPANA_SITE", "local")

    def kaapana_home(self) -> KaapanaHome:
        return KaapanaHome(Path(self.home)) if self.home else KaapanaHome.from_env()

    @property
    def spool(self) -> Path:
        return self.kaapana_home().incoming

    def targets(self, lake: Lake) -> IngestTargets:
        home = self.kaapana_home().ensure()
        return IngestTargets(lake=lake, archive=home.archive, quarantine=home.quarantine)


def build_resources(env: str | None = None) -> dict[str, dg.ConfigurableResource]:
    """Resources for KAAPANA_ENV: `local` (embedded defaults) or `k8s` (URIs from the
    environment of the user-code deployment)."""
    env = env or os.environ.get("KAAPANA_ENV", "local")
    if env == "local":
        # Paths resolve from KAAPANA_HOME when a run starts, not when this module loads.
        return {
            "lake": LakeResource(),
            "archive": ArchiveResource(),
            "cohort_definitions": CohortDefinitionsResource(),
            "nnunet_settings": NnunetResource(),
            "mlflow": MlflowResource(),
            "federation": FederationResource(),
            "federated_site": FederatedSiteResource(),
            "extensions": ExtensionRunner(),
            "dicom_node": DicomNodeResource(
                ae_title=os.environ.get("KAAPANA_DICOM_NODE_AET", ""),
                host=os.environ.get("KAAPANA_DICOM_NODE_HOST", "127.0.0.1"),
                port=int(os.environ.get("KAAPANA_DICOM_NODE_PORT", "104")),
            ),
        }
    if env == "k8s":
        return {
            "lake": LakeResource(
                uri=dg.EnvVar("KAAPANA_LAKE_URI"),
                storage_options={
                    "AWS_ENDPOINT_URL": os.environ.get("AWS_ENDPOINT_URL", ""),
                    "AWS_REGION": os.environ.get("AWS_REGION", "us-east-1"),
                    "AWS_ALLOW_HTTP": os.environ.get("AWS_ALLOW_HTTP", "false"),
                },
            ),
            "archive": ArchiveResource(home=dg.EnvVar("KAAPANA_HOME")),
            "cohort_definitions": CohortDefinitionsResource(folder=dg.EnvVar("KAAPANA_COHORTS")),
            "nnunet_settings": NnunetResource(device="cuda", schedule="full", threads=8),
            "mlflow": MlflowResource(tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"),
                                     artifact_root=dg.EnvVar("KAAPANA_MLFLOW_ARTIFACTS")),
            # Sites from $KAAPANA_FEDERATION (YAML); this site's identity from KAAPANA_SITE/_KEY.
            "federation": FederationResource(schedule="full"),
            "federated_site": FederatedSiteResource(),
            "extensions": ExtensionRunner(mode="k8s", image=dg.EnvVar("KAAPANA_EXTENSION_IMAGE"),
                                          home_claim=os.environ.get("KAAPANA_HOME_PVC", "kaapana-home")),
            "dicom_node": DicomNodeResource(
                ae_title=dg.EnvVar("KAAPANA_DICOM_NODE_AET"), host=dg.EnvVar("KAAPANA_DICOM_NODE_HOST"),
                port=int(os.environ.get("KAAPANA_DICOM_NODE_PORT", "104")),
            ),
        }
    raise ValueError(f"KAAPANA_ENV must be 'local' or 'k8s', not {env!r}")


def site_resources(home: Path, cohorts: Path | None = None, site: str = "",
                   **nnunet: object) -> dict[str, dg.ConfigurableResource]:
    """Every resource of one site pinned to its own home (tests, benchmarks, and sites run
    side by side on one machine): lake, archive, MLflow and nnU-Net work all under `home`."""
    return {
        "lake": LakeResource(uri=str(home / "lake")),
        "archive": ArchiveResource(home=str(home), site=site),
        "cohort_definitions": CohortDefinitionsResource(folder=str(cohorts) if cohorts else ""),
        "nnunet_settings": NnunetResource(workdir=str(home / "nnunet"), **nnunet),  # type: ignore[arg-type]
        "mlflow": MlflowResource(tracking_uri=f"sqlite:///{home / 'mlflow.db'}", artifact_root=(home / "mlartifacts").as_uri()),
        "dicom_node": DicomNodeResource(),
        "federation": FederationResource(exchange=str(home / "exchange")),
        "federated_site": FederatedSiteResource(name=site),
        "extensions": ExtensionRunner(),
    }
