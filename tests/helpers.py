"""Shared test helpers and constants (the fixtures that use them live in conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from kaapana_assets.cohorts.definitions import CohortDefinition
from kaapana_assets.federation.store import FederationStore
from kaapana_assets.home import KaapanaHome
from kaapana_assets.synthetic import GeneratedStudy

SMALL = {"slices": 12, "matrix": 40}  # small grids: same scanners, fewer voxels
REPO = Path(__file__).resolve().parents[1]  # the repository root, whichever folder of tests/ asks

# The browser tests: Debian's chromium, headless, loopback only, nothing phoning home.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
    "--disable-breakpad", "--metrics-recording-only", "--no-first-run", "--no-pings", "--disable-extensions",
    "--proxy-server=direct://", "--proxy-bypass-list=*", "--disable-gpu", "--disable-quic",
]
ARTIFACTS = Path(os.environ.get("KAAPANA_TEST_ARTIFACTS", REPO / "test-artifacts"))  # their screenshots


@dataclass
class EncodedCorpus:
    """One annotated study (site-a: unsigned pixels, which every encoder takes) and its CT
    series re-encoded by dcmtk, GDCM and OpenJPH in every transfer syntax they write."""

    study: GeneratedStudy
    root: Path
    series: dict[str, list[Path]]  # encoding name -> the CT series' files in that encoding
    segs: dict[str, Path]  # encoding name -> the reference SEG in that encoding (native syntaxes)


@dataclass(frozen=True)
class ViewerLink:
    """A link into the OHIF viewer, taken apart: where it points, OHIF's route, its query."""

    origin: str  # scheme://host:port
    route: str  # "/viewer", "/segmentation"
    query: dict[str, list[str]]


def viewer_link(url: str) -> ViewerLink:
    parts = urlsplit(url)
    return ViewerLink(f"{parts.scheme}://{parts.netloc}", parts.path, parse_qs(parts.query, strict_parsing=True))


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
    """Three sites, each with its own KAAPANA_HOME, and the hub's folder beside them. Nothing
    is shared: the hub reaches the sites only through a SuperLink their SuperNodes dial."""

    root: Path
    homes: dict[str, KaapanaHome]
    keys: dict[str, str]

    @property
    def hub_store(self) -> FederationStore:
        return FederationStore(KaapanaHome(self.root / "hub").hub_federation)

    def local_sites(self, sites: tuple[str, ...] = SITES, devices: dict[str, str] | None = None) -> list:
        from kaapana_assets.federation.local import LocalSite

        # One torch thread each: three sites share two cores.
        return [LocalSite(s, self.homes[s].root, self.keys[s], (devices or {}).get(s, "cpu"), threads=1) for s in sites]

    def federation_file(self, sites: tuple[str, ...] = SITES, keys: dict[str, str] | None = None) -> Path:
        from kaapana_assets.federation.sites import SiteEntry, write_sites

        keys = keys or self.keys
        name = "federation-" + "-".join(s.removeprefix("site-") for s in sites) + ".yaml"
        return write_sites(self.root / "hub" / name, [SiteEntry(s, key=keys[s]) for s in sites])

    def resource(self, flower, sites: tuple[str, ...] = SITES, min_sites: int = 2, rounds: int = 3,  # type: ignore[no-untyped-def]
                 keys: dict[str, str] | None = None, local_epochs: int = 2, iterations_per_epoch: int = 6,
                 **options):  # type: ignore[no-untyped-def]
        from resources.federation import FederationResource

        return FederationResource(
            superlink=flower.connection.address, root_certificate=str(flower.connection.root_certificate),
            federation_file=str(self.federation_file(sites, keys)), folder=str(self.hub_store.root),
            rounds=rounds, min_sites=min_sites, schedule="tiny", local_epochs=local_epochs,
            iterations_per_epoch=iterations_per_epoch,
            timeout_s=600.0, **options,
        )

    def hub(self, federation) -> dict:  # type: ignore[no-untyped-def]
        from resources import site_resources

        return {**site_resources(self.root / "hub", device="cpu", promotion_dice=0.05), "federation": federation}

    @contextmanager
    def network(self, folder: str) -> Iterator:
        """A SuperLink and the three sites' SuperNodes as processes, kept under hub/<folder>,
        started on entry and closed on exit (test modules hold one each, module-scoped)."""
        from kaapana_assets.federation.local import LocalFederation

        network = LocalFederation(self.root / "hub" / folder, self.local_sites())
        try:
            yield network.start()
        finally:
            network.close()


def can_unshare() -> bool:
    """Whether this process may run a command in a private network namespace (`unshare -n`, as root)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0

