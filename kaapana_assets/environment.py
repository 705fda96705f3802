"""Every environment variable the platform reads, read in one place (as dagster-open-platform's
`environment_helpers` do). `build_resources` turns an `Environment` into resources with
explicit values, so the Dagster UI shows the value in use instead of an empty field, and no
variable is read in two places. Plain module: no dagster here."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

DEFAULT_HOME = ".kaapana"
# Where `kaapana dicomweb --viewer` answers by default (`make dev`): the links in the UI open it.
DEFAULT_VIEWER_URL = "http://127.0.0.1:8080"


def _json(environ: Mapping[str, str], name: str, default: Any) -> Any:
    raw = environ.get(name)
    if not raw:
        return default
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} must be JSON: {exc}") from None


def _unsafe_store(value: str) -> bool:
    if value not in ("", "allow", "refuse"):
        raise ValueError(f"KAAPANA_LAKE_UNSAFE_STORE must be 'allow' or 'refuse', not {value!r}")
    return value == "allow"


class EnvironmentKind(StrEnum):
    """KAAPANA_ENV: where the platform runs."""

    LOCAL = "local"  # embedded defaults under KAAPANA_HOME
    K8S = "k8s"  # a user-code deployment: URIs and pods from its environment

    @classmethod
    def parse(cls, value: str) -> EnvironmentKind:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"KAAPANA_ENV must be {' or '.join(repr(k.value) for k in cls)}, not {value!r}") from None


@dataclass(frozen=True)
class Environment:
    env: EnvironmentKind  # KAAPANA_ENV
    home: Path  # KAAPANA_HOME
    site: str  # KAAPANA_SITE
    site_key_set: bool  # KAAPANA_SITE_KEY is a secret: only whether it is set is read here
    superlink: str  # KAAPANA_SUPERLINK: host:port of the hub's Flower SuperLink
    superlink_ca: str  # KAAPANA_SUPERLINK_CA: CA certificate of the SuperLink
    federation_file: str  # KAAPANA_FEDERATION
    cohorts: str  # KAAPANA_COHORTS
    training_schedule: str  # KAAPANA_TRAINING_SCHEDULE
    segmentation_model: str  # KAAPANA_SEGMENTATION_MODEL
    resegment_cohort: str  # KAAPANA_RESEGMENT_COHORT
    mlflow_tracking_uri: str  # MLFLOW_TRACKING_URI
    mlflow_artifacts: str  # KAAPANA_MLFLOW_ARTIFACTS
    lake_uri: str  # KAAPANA_LAKE_URI
    s3_options: dict[str, str]  # AWS_ENDPOINT_URL, AWS_REGION, AWS_ALLOW_HTTP (no secrets: the UI shows them)
    s3_access_key_id: str  # AWS_ACCESS_KEY_ID
    s3_secret_access_key: str = field(repr=False)  # AWS_SECRET_ACCESS_KEY
    lake_unsafe_store: bool  # KAAPANA_LAKE_UNSAFE_STORE=allow: write to a store without conditional writes
    dicom_node_aet: str  # KAAPANA_DICOM_NODE_AET
    dicom_node_host: str  # KAAPANA_DICOM_NODE_HOST
    dicom_node_port: int  # KAAPANA_DICOM_NODE_PORT
    extension_image: str  # KAAPANA_EXTENSION_IMAGE
    home_claim: str  # KAAPANA_HOME_PVC
    gpu_node_selector: dict[str, str]  # KAAPANA_GPU_NODE_SELECTOR (JSON)
    gpu_tolerations: list[dict[str, str]]  # KAAPANA_GPU_TOLERATIONS (JSON)
    viewer_url: str  # KAAPANA_VIEWER_URL: the DICOMweb service with the OHIF viewer, as a browser reaches it
    # KAAPANA_PROJECT_AE_TITLES (JSON): called AE title → project, beside Kaapana's KP-<PROJECT>
    project_ae_titles: dict[str, str]
    operator: str  # KAAPANA_OPERATOR, else USER: who `kaapana project add-series / remove-series` logs

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None, home: Path | None = None) -> Environment:
        """The environment (os.environ unless given); `home` overrides KAAPANA_HOME (a CLI --home)."""
        e = os.environ if environ is None else environ
        env = EnvironmentKind.parse(e.get("KAAPANA_ENV", EnvironmentKind.LOCAL))
        home = (home or Path(e.get("KAAPANA_HOME", DEFAULT_HOME))).resolve()
        viewer_url = e.get("KAAPANA_VIEWER_URL") or DEFAULT_VIEWER_URL
        if not viewer_url.startswith(("http://", "https://")):
            raise ValueError(f"KAAPANA_VIEWER_URL must be an http(s) URL, not {viewer_url!r}")
        return cls(
            env=env,
            home=home,
            site=e.get("KAAPANA_SITE", ""),
            site_key_set=bool(e.get("KAAPANA_SITE_KEY")),
            superlink=e.get("KAAPANA_SUPERLINK", "127.0.0.1:9092"),
            superlink_ca=e.get("KAAPANA_SUPERLINK_CA", ""),
            federation_file=e.get("KAAPANA_FEDERATION", ""),
            cohorts=e.get("KAAPANA_COHORTS", ""),
            training_schedule=e.get("KAAPANA_TRAINING_SCHEDULE", "full" if env is EnvironmentKind.K8S else "short"),
            segmentation_model=e.get("KAAPANA_SEGMENTATION_MODEL", "nnunet-liver-train"),
            resegment_cohort=e.get("KAAPANA_RESEGMENT_COHORT", ""),
            mlflow_tracking_uri=e.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}",
            # With a tracking server its --artifacts-destination decides (proxied: pods need no
            # credentials for models); with a local store, the home's folder.
            mlflow_artifacts=e.get("KAAPANA_MLFLOW_ARTIFACTS") or (
                "" if e.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://"))
                else (home / "mlartifacts").as_uri()),
            lake_uri=e.get("KAAPANA_LAKE_URI") or str(home / "lake"),
            s3_options={"AWS_ENDPOINT_URL": e.get("AWS_ENDPOINT_URL", ""), "AWS_REGION": e.get("AWS_REGION", "us-east-1"),
                        "AWS_ALLOW_HTTP": e.get("AWS_ALLOW_HTTP", "false")},
            s3_access_key_id=e.get("AWS_ACCESS_KEY_ID", ""),
            s3_secret_access_key=e.get("AWS_SECRET_ACCESS_KEY", ""),
            lake_unsafe_store=_unsafe_store(e.get("KAAPANA_LAKE_UNSAFE_STORE", "")),
            dicom_node_aet=e.get("KAAPANA_DICOM_NODE_AET", ""),
            dicom_node_host=e.get("KAAPANA_DICOM_NODE_HOST", "127.0.0.1"),
            dicom_node_port=int(e.get("KAAPANA_DICOM_NODE_PORT", "104")),
            extension_image=e.get("KAAPANA_EXTENSION_IMAGE", ""),
            home_claim=e.get("KAAPANA_HOME_PVC", "kaapana-home"),
            gpu_node_selector=_json(e, "KAAPANA_GPU_NODE_SELECTOR", {"nvidia.com/gpu.present": "true"}),
            gpu_tolerations=_json(e, "KAAPANA_GPU_TOLERATIONS",
                                  [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
            viewer_url=viewer_url,
            project_ae_titles=_json(e, "KAAPANA_PROJECT_AE_TITLES", {}),
            operator=e.get("KAAPANA_OPERATOR") or e.get("USER", ""),
        )

    @property
    def lake_storage_options(self) -> dict[str, str]:
        """deltalake's storage options for the lake: none for a folder; endpoint, region,
        AWS_ALLOW_HTTP and credentials for s3://."""
        return self.s3_storage_options if self.lake_uri.startswith(("s3://", "s3a://")) else {}

    @property
    def s3_storage_options(self) -> dict[str, str]:
        """deltalake's storage options for any s3:// URI: endpoint, region, AWS_ALLOW_HTTP, credentials."""
        options = {key: value for key, value in self.s3_options.items() if value}
        if self.s3_access_key_id:
            options["AWS_ACCESS_KEY_ID"] = self.s3_access_key_id
        if self.s3_secret_access_key:
            options["AWS_SECRET_ACCESS_KEY"] = self.s3_secret_access_key
        return options

    @property
    def pod_home(self) -> str:
        """Where KAAPANA_HOME is mounted in step and extension pods."""
        return str(self.home) if self.env is EnvironmentKind.K8S else "/kaapana"


@contextmanager
def unchanged_environment(*names: str) -> Iterator[None]:
    """Undo what a library writes into this process's environment meanwhile.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI; in a process that serves more
    than one home (the demo, a code server, the tests) the next `Environment` would then read
    another home's MLflow store."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
