"""MLflow: runs, metrics, artifacts and the model registry (registering and promoting here;
looking a version up: kaapana_assets/nnunet/registry.py). Plain Python (the CLI uses it too);
the Dagster resource in resources/mlflow.py only configures it."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kaapana_assets.environment import Environment, unchanged_environment
from kaapana_assets.nnunet.registry import PRODUCTION


def code_version() -> dict[str, str]:
    """The code that ran: package version and, in a git checkout, the commit."""
    from kaapana_assets import __version__

    info = {"kaapana_assets": __version__}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
        if sha:
            info["git_sha"] = sha
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def model_name_for(cohort: str) -> str:
    return f"nnunet-{cohort}"


class Tracking:
    def __init__(self, tracking_uri: str, artifact_root: str, experiment: str = "kaapana"):
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self.experiment = experiment

    def _activate(self) -> str:
        import mlflow

        with unchanged_environment("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(self.tracking_uri)  # the fluent API's store; not the environment's
        client = mlflow.MlflowClient(self.tracking_uri)
        existing = client.get_experiment_by_name(self.experiment)
        if existing is not None:
            return existing.experiment_id
        if self.artifact_root and "://" not in self.artifact_root.removeprefix("file://") \
                and not self.artifact_root.startswith("mlflow-artifacts:"):
            Path(self.artifact_root.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        # Empty: the tracking server's own --artifacts-destination (an object store, proxied by it).
        return client.create_experiment(self.experiment, artifact_location=self.artifact_root or None)

    def client(self):
        import mlflow

        self._activate()
        return mlflow.MlflowClient(self.tracking_uri)

    @contextmanager
    def run(self, name: str, tags: Mapping[str, str] | None = None, parent_run_id: str | None = None) -> Iterator[Any]:
        """An MLflow run (nested under `parent_run_id` when given); failed runs end FAILED."""
        import mlflow

        experiment_id = self._activate()
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=all_tags, nested=bool(parent_run_id)) as run:
            yield run

    def find_run(self, tags: Mapping[str, str]) -> str | None:
        """The newest run carrying all `tags` (e.g. a federated experiment's parent run)."""
        experiment = self.client().get_experiment_by_name(self.experiment)
        if experiment is None:
            return None
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client().search_runs([experiment.experiment_id], query, max_results=1,
                                         order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def register(self, run_id: str, artifact_path: str, model_name: str, tags: Mapping[str, str],
                 description: str = "") -> Any:
        """A new version of `model_name` whose source is the run's artifact folder."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        try:
            client.create_registered_model(model_name, description="nnU-Net v2 models trained by kaapana_assets")
        except MlflowException:
            pass  # already registered
        run = client.get_run(run_id)
        return client.create_model_version(
            model_name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id,
            tags={k: str(v) for k, v in tags.items()}, description=description,
        )

    def promote(self, model_name: str, version: int | str, alias: str = PRODUCTION) -> None:
        self.client().set_registered_model_alias(model_name, alias, str(version))

    def download(self, model_version: Any, target: Path | None = None) -> Path:
        """The model folder of a registered version, on local disk."""
        import mlflow

        self._activate()
        target = target or Path(tempfile.mkdtemp(prefix=f"model-{model_version.name}-v{model_version.version}-"))
        path = mlflow.artifacts.download_artifacts(artifact_uri=model_version.source, dst_path=str(target),
                                                   tracking_uri=self.tracking_uri)
        return Path(path)


def default_tracking(environment: Environment) -> Tracking:
    """The environment's tracking server, or its home's own sqlite store and artifacts."""
    return Tracking(tracking_uri=environment.mlflow_tracking_uri, artifact_root=environment.mlflow_artifacts)
