"""MLflow tracking and registry, configured per site (sqlite + local artifacts by default)."""

import dagster as dg
from pydantic import Field

from kaapana_assets.training.tracking import Tracking, default_tracking


class MlflowResource(dg.ConfigurableResource):
    tracking_uri: str = Field(default="", description="MLflow tracking URI; empty: sqlite:///$KAAPANA_HOME/mlflow.db")
    artifact_root: str = Field(default="", description="Artifact location; empty: $KAAPANA_HOME/mlartifacts")
    experiment: str = Field(default="kaapana")

    def tracking(self) -> Tracking:
        default = default_tracking()
        return Tracking(self.tracking_uri or default.tracking_uri, self.artifact_root or default.artifact_root,
                        self.experiment)
