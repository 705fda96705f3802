"""The resources of a code location, from an `Environment` read once at the top
(definitions.py, a CLI command, the demo), and every resource of one site pinned to its own
home (tests, benchmarks, the ClientApp's site runs)."""

from pathlib import Path

import dagster as dg

from kaapana_assets.environment import DEFAULT_VIEWER_URL, Environment, EnvironmentKind
from kaapana_assets.home import KaapanaHome
from kaapana_assets.lake import Lake
from resources.cohorts import CohortDefinitionsResource
from resources.dicom_node import DicomNodeResource
from resources.extensions import ExtensionRunner
from resources.federation import FederatedSiteResource, FederationResource
from resources.mlflow import MlflowResource
from resources.nnunet import NnunetResource
from resources.storage import ArchiveResource, LakeResource
from resources.viewer import ViewerResource


def build_resources(environment: Environment) -> dict[str, dg.ConfigurableResource]:
    """Resources for the environment (read once, when the definitions load): `local`
    (embedded defaults under KAAPANA_HOME) or `k8s` (URIs from the user-code deployment's
    environment). Every value is explicit, so the UI shows what is in use; secrets stay
    `dg.EnvVar`s."""
    e = environment
    k8s = e.env is EnvironmentKind.K8S
    return {
        "lake": lake_resource(e),
        "archive": ArchiveResource(home=str(e.home), site=e.site),
        "cohort_definitions": CohortDefinitionsResource(folder=e.cohorts),
        "nnunet_settings": NnunetResource(device="cuda", schedule=e.training_schedule, threads=8,
                                          workdir=str(e.home / "nnunet"), segmentation_model=e.segmentation_model,
                                          resegment_cohort=e.resegment_cohort)
        if k8s else NnunetResource(schedule=e.training_schedule, workdir=str(e.home / "nnunet"),
                                   segmentation_model=e.segmentation_model, resegment_cohort=e.resegment_cohort),
        "mlflow": MlflowResource(tracking_uri=e.mlflow_tracking_uri, artifact_root=e.mlflow_artifacts),
        # Sites from $KAAPANA_FEDERATION (YAML); this site's identity from KAAPANA_SITE/_KEY.
        "federation": FederationResource(superlink=e.superlink, root_certificate=e.superlink_ca,
                                         federation_file=e.federation_file, folder=str(KaapanaHome(e.home).hub_federation),
                                         schedule=e.training_schedule),
        "federated_site": FederatedSiteResource(name=e.site, folder=str(KaapanaHome(e.home).site_federation)),
        "extensions": ExtensionRunner(mode="k8s", image=e.extension_image, home_claim=e.home_claim,
                                      mount_path=e.pod_home) if k8s else ExtensionRunner(),
        "dicom_node": DicomNodeResource(ae_title=e.dicom_node_aet, host=e.dicom_node_host, port=e.dicom_node_port),
        "viewer": ViewerResource(url=e.viewer_url),
    }


def lake_resource(e: Environment) -> LakeResource:
    """The lake the environment names; on an object store its settings, the credentials as
    `dg.EnvVar`s (the UI shows their names, not their values)."""
    k8s = e.env is EnvironmentKind.K8S
    uri: str | dg.EnvVar = dg.EnvVar("KAAPANA_LAKE_URI") if k8s else e.lake_uri
    options = {key: value for key, value in e.lake_storage_options.items() if not key.startswith("AWS_SECRET")
               and key != "AWS_ACCESS_KEY_ID"}
    return LakeResource(uri=uri, storage_options=options,
                        access_key_id=dg.EnvVar("AWS_ACCESS_KEY_ID") if e.s3_access_key_id else "",
                        secret_access_key=dg.EnvVar("AWS_SECRET_ACCESS_KEY") if e.s3_secret_access_key else "",
                        unsafe_store_allowed=e.lake_unsafe_store)


def site_resources(home: Path, cohorts: Path | None = None, site: str = "", lake: Lake | None = None,
                   **nnunet: object) -> dict[str, dg.ConfigurableResource]:
    """Every resource of one site pinned to its own home (tests, benchmarks, and sites run
    side by side on one machine): lake, archive, MLflow and nnU-Net work all under `home`;
    the lake elsewhere when `lake` is given (an object store)."""
    return {
        "lake": LakeResource(uri=lake.root, storage_options=lake.storage_options or {},
                             unsafe_store_allowed=lake.unsafe_store_allowed) if lake
        else LakeResource(uri=str(home / "lake")),
        "archive": ArchiveResource(home=str(home), site=site),
        "cohort_definitions": CohortDefinitionsResource(folder=str(cohorts) if cohorts else ""),
        "nnunet_settings": NnunetResource(workdir=str(home / "nnunet"), **nnunet),  # type: ignore[arg-type]
        "mlflow": MlflowResource(tracking_uri=f"sqlite:///{home / 'mlflow.db'}", artifact_root=(home / "mlartifacts").as_uri()),
        "dicom_node": DicomNodeResource(),
        "federation": FederationResource(folder=str(KaapanaHome(home).hub_federation)),
        "federated_site": FederatedSiteResource(name=site, folder=str(KaapanaHome(home).site_federation)),
        "extensions": ExtensionRunner(),
        "viewer": ViewerResource(url=DEFAULT_VIEWER_URL),
    }
