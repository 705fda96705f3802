"""kaapana_assets: a federated medical-imaging research platform as a Dagster code location."""

__version__ = "0.1.0"
