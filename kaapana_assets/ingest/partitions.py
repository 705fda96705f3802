import dagster as dg

# One partition per StudyInstanceUID, added by the incoming_studies sensor.
studies_partitions = dg.DynamicPartitionsDefinition(name="studies")
