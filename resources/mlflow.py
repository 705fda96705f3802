"""MLflow tracking and registry, configured per site (sqlite + local artifacts by default)."""

import dagster as dg
from pydantic import Field

from kaapana_assets.training.tracking import Tracking


class MlflowResource(dg.ConfigurableResource):
    tracking_uri: str = Field(description="MLflow tracking URI, e.g. sqlite:///$KAAPANA_HOME/mlflow.db")
    artifact_root: str = Field(description="Artifact location, e.g. $KAAPANA_HOME/mlartifacts")
    experiment: str = Field(default="kaapana")

    def tracking(self) -> Tracking:
        return Tracking(self.tracking_uri, self.artifact_root, self.experiment)
