"""Shared test helpers and constants (the fixtures that use them live in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kaapana_assets.cohorts.definitions import CohortDefinition
from kaapana_assets.federated.store import ExchangeStore
from kaapana_assets.home import KaapanaHome
from kaapana_assets.synthetic import GeneratedStudy

SMALL = {"slices": 12, "matrix": 40}  # small grids: same scanners, fewer voxels


@dataclass
class EncodedCorpus:
    """One annotated study (site-a: unsigned pixels, which every encoder takes) and its CT
    series re-encoded by dcmtk, GDCM and OpenJPH in every transfer syntax they write."""

    study: GeneratedStudy
    root: Path
    series: dict[str, list[Path]]  # encoding name -> the CT series' files in that encoding
    segs: dict[str, Path]  # encoding name -> the reference SEG in that encoding (native syntaxes)
    missing_tools: list[str]


def dicom_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


TRAIN_GRID = {"slices": 16, "matrix": 48}
TRAIN_COHORT = """name: liver-train
purpose: train
required_labels: [liver]
filter:
  modality: CT
  has_reference_segmentation: true
harmonization:
  min_size: 4
"""


class TrainedSite:
    """One site after the whole training flow ran through Dagster (tiny schedule)."""

    def __init__(self, root: Path, studies: list, instance, resources: dict, result) -> None:  # type: ignore[no-untyped-def]
        self.root, self.studies, self.instance, self.resources, self.result = root, studies, instance, resources, result

    @property
    def home(self) -> KaapanaHome:
        return KaapanaHome(self.root / "home")

    def tracking(self):  # type: ignore[no-untyped-def]
        return self.resources["mlflow"].tracking()


SITES = ("site-a", "site-b", "site-c")  # three scanner profiles: non-IID by construction
COHORT = CohortDefinition.model_validate({"name": "liver-train", "purpose": "train", "required_labels": ["liver"],
                                          "filter": {"modality": "CT", "has_reference_segmentation": True}})


@dataclass
class Federation:
    root: Path
    homes: dict[str, KaapanaHome]
    keys: dict[str, str]

    @property
    def exchange(self) -> ExchangeStore:
        return ExchangeStore(self.root / "exchange")

    def resource(self, sites: tuple[str, ...] = SITES, min_sites: int = 2, rounds: int = 3,
                 devices: dict[str, str] | None = None, keys: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        from resources.federation import FederatedSite, FederationResource

        keys = keys or self.keys
        return FederationResource(
            sites=[FederatedSite(name=s, transport="local", home=str(self.homes[s].root), key=keys[s],
                                 device=(devices or {}).get(s, "cpu")) for s in sites],
            exchange=str(self.root / "exchange"), rounds=rounds, min_sites=min_sites, schedule="tiny",
            local_epochs=2, iterations_per_epoch=6,
        )

    def hub(self, federation) -> dict:  # type: ignore[no-untyped-def]
        from resources import site_resources

        return {**site_resources(self.root / "hub", device="cpu", promotion_dice=0.05), "federation": federation}

