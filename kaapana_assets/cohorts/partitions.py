import dagster as dg

# One partition per cohort definition, registered by the cohort_definitions sensor.
COHORTS = "cohorts"  # the partitions definition's name, typed str for instance calls
cohorts_partitions = dg.DynamicPartitionsDefinition(name=COHORTS)
