"""`kaapana gateway`: one login (OpenID Connect) in front of every web surface, the Dagster
webserver and its GraphQL, the DICOMweb service and viewer, MLflow's UI and the exporter."""
