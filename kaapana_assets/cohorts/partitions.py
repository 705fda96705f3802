import dagster as dg

# One partition per cohort definition, registered by the cohort_definitions sensor.
cohorts_partitions = dg.DynamicPartitionsDefinition(name="cohorts")
