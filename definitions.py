"""The code location: one Definitions, resources chosen by KAAPANA_ENV (local | k8s)."""

import dagster as dg

from kaapana_assets.ingest import assets as ingest
from resources import build_resources
from sensors.incoming import incoming_studies

defs = dg.Definitions.merge(
    ingest.defs,
    dg.Definitions(sensors=[incoming_studies], resources=build_resources()),
)
