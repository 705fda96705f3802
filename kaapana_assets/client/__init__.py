"""The researcher's Python client (a stable import for notebooks):

    from kaapana_assets.client import Kaapana

See `api.py` for what it offers."""

from kaapana_assets.client.api import Case, Cohort, Geometry, Kaapana, NotFound, SegArrays

__all__ = ["Case", "Cohort", "Geometry", "Kaapana", "NotFound", "SegArrays"]
