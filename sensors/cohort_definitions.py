"""`cohort_definitions`: registers a `cohorts` partition for every valid definition file."""

import dagster as dg

from kaapana_assets.cohorts.partitions import COHORTS, cohorts_partitions
from resources.cohorts import CohortDefinitionsResource


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a cohorts partition per valid YAML definition; reports invalid files by name and field.",
)
def cohort_definitions(context: dg.SensorEvaluationContext, cohort_definitions: CohortDefinitionsResource) -> dg.SensorResult:
    found, errors = cohort_definitions.all()
    for error in errors:
        context.log.error(f"invalid cohort definition: {error}")
    existing = set(context.instance.get_dynamic_partitions(COHORTS))
    new = sorted(set(found) - existing)
    skip = None
    if not new:
        skip = f"{len(found)} cohort(s) registered" + (f"; {len(errors)} invalid file(s): {errors[0]}" if errors else "")
    return dg.SensorResult(
        dynamic_partitions_requests=[cohorts_partitions.build_add_request(new)] if new else [],
        skip_reason=skip,
    )
