import dagster as dg

# One partition per StudyInstanceUID, added by the incoming_studies sensor.
STUDIES = "studies"  # the partitions definition's name, typed str for instance calls
studies_partitions = dg.DynamicPartitionsDefinition(name=STUDIES)
