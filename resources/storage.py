"""Storage resources. Local defaults live under KAAPANA_HOME; production swaps URIs only."""


from pathlib import Path

import dagster as dg
from pydantic import Field

from kaapana_assets.archive.service import Archive
from kaapana_assets.environment import Environment
from kaapana_assets.home import KaapanaHome
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
        return Lake(self.uri or Environment.read().lake_uri, self.storage_options or None)


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
        return KaapanaHome(Path(self.home)) if self.home else KaapanaHome.from_env()

    @property
    def spool(self) -> Path:
        return self.kaapana_home().incoming

    def open(self, lake: Lake) -> Archive:
        """This home's archive, indexed in `lake`."""
        home = self.kaapana_home().ensure()
        return Archive(lake=lake, root=home.archive, quarantine=home.quarantine)


def build_resources(environment: Environment | None = None) -> dict[str, dg.ConfigurableResource]:
    """Resources for the environment (read once, when the definitions load): `local`
    (embedded defaults under KAAPANA_HOME) or `k8s` (URIs from the user-code deployment's
    environment). Every value is explicit, so the UI shows what is in use; secrets stay
    `dg.EnvVar`s."""
    e = environment or Environment.read()
    k8s = e.env == "k8s"
    return {
        "lake": LakeResource(uri=dg.EnvVar("KAAPANA_LAKE_URI") if k8s else e.lake_uri,
                             storage_options=e.s3_options if k8s else {}),
        "archive": ArchiveResource(home=str(e.home), site=e.site),
        "cohort_definitions": CohortDefinitionsResource(folder=e.cohorts),
        "nnunet_settings": NnunetResource(device="cuda", schedule=e.training_schedule, threads=8,
                                          workdir=str(e.home / "nnunet"), segmentation_model=e.segmentation_model)
        if k8s else NnunetResource(schedule=e.training_schedule, workdir=str(e.home / "nnunet"),
                                   segmentation_model=e.segmentation_model),
        "mlflow": MlflowResource(tracking_uri=e.mlflow_tracking_uri, artifact_root=e.mlflow_artifacts),
        # Sites from $KAAPANA_FEDERATION (YAML); this site's identity from KAAPANA_SITE/_KEY.
        "federation": FederationResource(superlink=e.superlink, root_certificate=e.superlink_ca,
                                         federation_file=e.federation_file, folder=str(KaapanaHome(e.home).hub_federation),
                                         schedule=e.training_schedule),
        "federated_site": FederatedSiteResource(name=e.site, folder=str(KaapanaHome(e.home).site_federation)),
        "extensions": ExtensionRunner(mode="k8s", image=e.extension_image, home_claim=e.home_claim,
                                      mount_path=e.pod_home) if k8s else ExtensionRunner(),
        "dicom_node": DicomNodeResource(ae_title=e.dicom_node_aet, host=e.dicom_node_host, port=e.dicom_node_port),
    }


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
        "federation": FederationResource(folder=str(KaapanaHome(home).hub_federation)),
        "federated_site": FederatedSiteResource(name=site, folder=str(KaapanaHome(home).site_federation)),
        "extensions": ExtensionRunner(),
    }
