"""Delta table schemas and the few helpers that read and write them."""

from kaapana_assets.lake.schemas import TABLES, TableSpec, table_named
from kaapana_assets.lake.tables import Lake, WriteResult

__all__ = ["TABLES", "TableSpec", "Lake", "WriteResult", "table_named"]
