"""The code location: one Definitions, resources chosen by KAAPANA_ENV (local | k8s)."""

import dagster as dg

from kaapana_assets.cohorts import assets as cohorts
from kaapana_assets.evaluation import assets as evaluation
from kaapana_assets.extensions import assets as extensions
from kaapana_assets.federated import assets as federated
from kaapana_assets.ingest import assets as ingest
from kaapana_assets.lake import assets as lake
from kaapana_assets.monitoring import assets as monitoring
from kaapana_assets.network import assets as network
from kaapana_assets.segmentation import assets as segmentation
from kaapana_assets.training import assets as training
from resources import build_resources
from sensors.cohort_definitions import cohort_definitions
from sensors.incoming import incoming_studies
from sensors.model_promotion import model_promotion

defs = dg.Definitions.merge(
    ingest.defs,
    cohorts.defs,
    training.defs,
    segmentation.defs,
    network.defs,
    federated.defs,
    extensions.defs,
    evaluation.defs,
    lake.defs,
    monitoring.defs,
    dg.Definitions(sensors=[incoming_studies, cohort_definitions, model_promotion], resources=build_resources()),
)
