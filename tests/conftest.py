"""Shared fixtures. Generated data lives in tmp paths; expensive corpora are made once per session."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests never reach the network and never phone home.
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kaapana_assets.cohorts.definitions import CohortDefinition  # noqa: E402
from kaapana_assets.cohorts.membership import snapshot_cohort  # noqa: E402
from kaapana_assets.federated.exchange import generate_site_key  # noqa: E402
from kaapana_assets.federated.store import ExchangeStore  # noqa: E402
from kaapana_assets.home import KaapanaHome  # noqa: E402
from kaapana_assets.lake import Lake  # noqa: E402
from kaapana_assets.ingest.pipeline import IngestTargets, ingest_files  # noqa: E402
from kaapana_assets.synthetic import GeneratedStudy, generate_site  # noqa: E402

SMALL = {"slices": 12, "matrix": 40}  # small grids: same scanners, fewer voxels


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[GeneratedStudy]]:
    """Two sites × three annotated studies on small grids (read-only: copy before ingesting)."""
    root = tmp_path_factory.mktemp("corpus")
    return {
        site: generate_site(site, 3, seed=11, out=root, with_annotations=True, **SMALL)
        for site in ("site-a", "site-b")
    }


@pytest.fixture(scope="session")
def corpus_root(corpus: dict[str, list[GeneratedStudy]]) -> Path:
    first = next(iter(corpus.values()))[0]
    return first.ct_files[0].parents[3]


@pytest.fixture(scope="session")
def full_size_study(tmp_path_factory: pytest.TempPathFactory) -> GeneratedStudy:
    """One study at the scanner's real grid, for validation with dciodvfy."""
    return generate_site("site-a", 1, seed=3, out=tmp_path_factory.mktemp("full"), with_annotations=True)[0]


@pytest.fixture
def home(tmp_path: Path) -> KaapanaHome:
    return KaapanaHome(tmp_path / "home").ensure()


@pytest.fixture
def targets(home: KaapanaHome) -> IngestTargets:
    return IngestTargets.for_home(home)


@pytest.fixture
def spool_copy(tmp_path: Path, corpus_root: Path) -> Path:
    """A private copy of the corpus that a test may ingest (and so delete) freely."""
    target = tmp_path / "spool"
    shutil.copytree(corpus_root, target)
    return target


@dataclass
class EncodedCorpus:
    """One annotated study (site-a: unsigned pixels, which every encoder takes) and its CT
    series re-encoded by dcmtk, GDCM and OpenJPH in every transfer syntax they write."""

    study: GeneratedStudy
    root: Path
    series: dict[str, list[Path]]  # encoding name -> the CT series' files in that encoding
    segs: dict[str, Path]  # encoding name -> the reference SEG in that encoding (native syntaxes)
    missing_tools: list[str]


@pytest.fixture(scope="session")
def encoded_corpus(tmp_path_factory: pytest.TempPathFactory) -> EncodedCorpus:
    from kaapana_assets.synthetic.transcode import ENCODINGS, transcode

    root = tmp_path_factory.mktemp("encoded")
    study = generate_site("site-a", 1, seed=5, out=root / "original", with_annotations=True, slices=6, matrix=40)[0]
    series: dict[str, list[Path]] = {}
    segs: dict[str, Path] = {}
    missing = sorted({e.tool for e in ENCODINGS if not e.available})
    for encoding in ENCODINGS:
        if not encoding.available:
            continue
        series[encoding.name] = [transcode(f, root / encoding.name / "ct" / f.name, encoding) for f in study.ct_files]
        if not encoding.transfer_syntax.startswith("1.2.840.10008.1.2.4") and encoding.name != "rle":
            segs[encoding.name] = transcode(study.seg_file, root / encoding.name / "seg" / study.seg_file.name, encoding)
    return EncodedCorpus(study, root, series, segs, missing)


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


@pytest.fixture(scope="session")
def trained_site(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Six annotated studies ingested, the liver-train cohort materialized with its checks,
    and a tiny nnU-Net trained, validated, registered and promoted — once per session."""
    import dagster as dg

    from kaapana_assets.cohorts.assets import cohorts, harmonization_checks
    from kaapana_assets.training.assets import nnunet_dataset, production_model, trained_model
    from resources import site_resources

    root = tmp_path_factory.mktemp("trained")
    home = KaapanaHome(root / "home").ensure()
    studies = generate_site("site-a", 6, seed=21, out=root / "generated", with_annotations=True, **TRAIN_GRID)
    from kaapana_assets.ingest.pipeline import ingest_files

    ingest_files([f for s in studies for f in s.files], IngestTargets.for_home(home), remove_sources=False)
    (root / "cohorts").mkdir()
    (root / "cohorts" / "liver-train.yaml").write_text(TRAIN_COHORT)
    resources = site_resources(home.root, root / "cohorts", device="cpu", schedule="tiny", promotion_dice=0.05)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("cohorts", ["liver-train"])
        result = dg.materialize(
            [cohorts, *harmonization_checks, nnunet_dataset, trained_model, production_model],
            partition_key="liver-train", instance=instance, resources=resources,
        )
        yield TrainedSite(root, studies, instance, resources, result)


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


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    """Three sites, four annotated studies each, ingested into each site's own home and its
    liver-train cohort snapshotted there."""
    root = tmp_path_factory.mktemp("federation")
    homes, keys = {}, {}
    for index, site in enumerate(SITES):
        home = KaapanaHome(root / site).ensure()
        studies = generate_site(site, 4, seed=41 + index, out=root / "generated", with_annotations=True, **TRAIN_GRID)
        ingest_files([f for s in studies for f in s.files], IngestTargets.for_home(home), remove_sources=False)
        snapshot_cohort(Lake(home.lake), COHORT)
        homes[site], keys[site] = home, generate_site_key()
    return Federation(root, homes, keys)


