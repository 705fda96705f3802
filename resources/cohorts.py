"""Where cohort definitions live."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from kaapana_assets.cohorts.definitions import (
    EXAMPLES,
    CohortDefinition,
    CohortDefinitionError,
    load_definition,
    load_definitions,
)


class CohortDefinitionsResource(dg.ConfigurableResource):
    """A folder of cohort YAML files (one cohort per file, named after the cohort)."""

    folder: str = Field(
        default="",
        description="Folder of cohort definitions; empty: the shipped examples",
    )

    def path(self) -> Path:
        return Path(self.folder or EXAMPLES)

    def all(self) -> tuple[dict[str, CohortDefinition], list[CohortDefinitionError]]:
        return load_definitions(self.path())

    def get(self, name: str) -> CohortDefinition:
        path = self.path() / f"{name}.yaml"
        if not path.exists():
            path = path.with_suffix(".yml")
        if not path.exists():
            raise CohortDefinitionError(self.path() / f"{name}.yaml", "(file)", "no such cohort definition")
        return load_definition(path)
