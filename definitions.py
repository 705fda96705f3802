"""The code location: one Definitions, resources chosen by KAAPANA_ENV (local | k8s).

The environment is read once, in resources/location.py (the asset modules' GPU op tags need
it when they import); the resources are built here from that same reading."""

import dagster as dg

from kaapana_assets.access import assets as access
from kaapana_assets.cohorts import assets as cohorts
from kaapana_assets.environment import Environment
from kaapana_assets.evaluation import assets as evaluation
from kaapana_assets.extensions import assets as extensions
from kaapana_assets.federated import assets as federated
from kaapana_assets.ingest import assets as ingest
from kaapana_assets.lake import assets as lake
from kaapana_assets.monitoring import assets as monitoring
from kaapana_assets.network import assets as network
from kaapana_assets.segmentation import assets as segmentation
from kaapana_assets.training import assets as training
from resources.build import build_resources
from resources.location import ENVIRONMENT
from sensors.cohort_definitions import cohort_definitions
from sensors.federated_rounds import federated_round_chain
from sensors.incoming import incoming_studies
from sensors.model_promotion import model_promotion
from sensors.segmentation_automation import segmentation_automation


def definitions_for(environment: Environment) -> dg.Definitions:
    """The code location with resources built for `environment` (a process top that sets its
    own environment, such as `kaapana demo`, passes the one it read)."""
    return dg.Definitions.merge(
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
        access.defs,
        dg.Definitions(sensors=[incoming_studies, cohort_definitions, model_promotion, segmentation_automation,
                                federated_round_chain],
                       resources=build_resources(environment)),
    )


defs = definitions_for(ENVIRONMENT)
