"""Shared fixtures. Generated data lives in tmp paths; expensive corpora are made once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Tests never reach the network and never phone home.
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kaapana_assets.cohorts.membership import snapshot_cohort  # noqa: E402
from kaapana_assets.federated.channel import generate_site_key  # noqa: E402
from kaapana_assets.home import KaapanaHome  # noqa: E402
from kaapana_assets.ingest.pipeline import IngestTargets, ingest_files  # noqa: E402
from kaapana_assets.lake import Lake  # noqa: E402
from kaapana_assets.synthetic import GeneratedStudy, generate_site  # noqa: E402
from tests.helpers import (  # noqa: E402
    COHORT,
    SITES,
    SMALL,
    TRAIN_COHORT,
    TRAIN_GRID,
    EncodedCorpus,
    Federation,
    TrainedSite,
)


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


