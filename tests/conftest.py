"""Shared fixtures. Generated data lives in tmp paths; expensive corpora are made once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Tests never reach the network and never phone home.
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kaapana_assets.home import KaapanaHome  # noqa: E402
from kaapana_assets.ingest.pipeline import IngestTargets  # noqa: E402
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


def dicom_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())
