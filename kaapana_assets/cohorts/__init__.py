"""Curated, versioned cohorts: definitions, membership snapshots, harmonization checks,
tags and site statistics. Plain modules; `assets.py` is the only Dagster part."""
