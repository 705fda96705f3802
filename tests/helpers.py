"""Shared test helpers and constants (the fixtures that use them live in conftest.py)."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow as pa
import pydicom
import pydicom.data
import pytest

from kaapana_assets.cohorts.definitions import CohortDefinition
from kaapana_assets.federation.local import free_port
from kaapana_assets.federation.store import FederationStore
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.spool import scan_spool
from kaapana_assets.ingest.volume import assemble_volume, seg_labels
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import COHORT_MEMBERS, INSTANCES, QUARANTINE, SERIES, STUDIES, TableSpec
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


# pydicom's shipped test files: DICOM written by others, in every shape pydicom knows.
PYDICOM_DATA = Path(pydicom.data.__file__).parent


def pydicom_files() -> list[Path]:
    return sorted(p for p in PYDICOM_DATA.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc"))


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

        # One torch thread each: three sites share two cores. site-a alone consents to
        # cross-site evaluation (its local baseline may travel to the others).
        return [LocalSite(s, self.homes[s].root, self.keys[s], (devices or {}).get(s, "cpu"), threads=1,
                          share_local_model=s == SITES[0]) for s in sites]

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


# -- DICOM networking against dcmtk (tests/network, tests/flows) ------------------------------

needs_dcmtk = pytest.mark.tools("storescu", "storescp")  # the dcmtk tools the receiver's tests talk to


class Receiver:
    """`kaapana receive` as a real process, with its log."""

    def __init__(self, home: Path, allow: list[str] | None = None, options: list[str] | None = None):
        self.home, self.port = home, free_port()
        self.log_path = home.parent / f"receiver-{self.port}.log"
        cmd = [sys.executable, "-m", "kaapana_assets.cli", "receive", "--home", str(home), "--port", str(self.port),
               "--ae-title", "KAAPANA", *(options or [])] + (["--allow", *allow] if allow else [])
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.echo():
                return
            time.sleep(0.2)
        raise RuntimeError(f"receiver did not start: {self.log()}")

    def echo(self, calling: str = "ECHOSCU") -> bool:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="KAAPANA")
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return bool(status) and status.Status == 0

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def accepting(self, count: int, timeout: float = 30) -> list[int]:
        """The PIDs of the worker processes that have started accepting, once `count` have."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = [int(pid) for pid in re.findall(r"worker \d+ \(pid (\d+)\) accepting", self.log())]
            if len(pids) >= count:
                return pids
            time.sleep(0.05)
        raise AssertionError(f"{count} workers did not start accepting: {self.log()}")

    def served_by(self, calling: str) -> list[int]:
        """The PID of the worker that accepted each association from `calling`, in log order."""
        return [int(pid) for pid in re.findall(rf"\[(\d+)\]: association from {calling} at \S+ accepted", self.log())]

    def spool_files(self) -> list[Path]:
        return sorted(Path(f.path) for f in scan_spool(self.home / "incoming"))  # not the receive journal

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"receiver ignored SIGTERM: {self.log()}") from None


def storescu(port: int, files: list[Path], calling: str = "STORESCU", propose: str | None = None,
             called: str = "KAAPANA") -> subprocess.CompletedProcess:
    """dcmtk's storescu proposing only the files' SOP classes (-R), in `propose` (an -x... option,
    e.g. -xs for JPEG Lossless SV1) with the uncompressed syntaxes as fallback; dcmtk converts
    to the accepted syntax when it must, so the caller checks what arrived."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(["storescu", "-R", *([propose] if propose else []), "-aet", calling, "-aec", called,
                           "127.0.0.1", str(port), *map(str, files)], env=env, capture_output=True, text=True, timeout=120)


def dataset_bytes(path: Path) -> bytes:
    """The data set after the file meta, byte for byte."""
    data = path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return data[meta_end:]


# -- a site's lake, made by hand (monitoring's figures, the federation's statistics step) ----

def merge_rows(lake: Lake, table: TableSpec, rows: list[dict]) -> None:
    lake.merge(table, pa.Table.from_pylist(rows, schema=table.schema))


def make_site_lake(root: Path) -> Lake:
    """Seven patients (five F, two M; five aged 60-69, two 70-79), one CT study and series
    each (six GE at 2.5 mm, one Philips at 0.8 mm, ten instances each), seven quarantined
    files (six not_dicom, one truncated), cohort c1 v1 (3 series) and v2 (6 series)."""
    lake = Lake(root)
    studies, series, instances = [], [], []
    for i in range(7):
        patient = f"PAT-{i:04d}"
        study, uid = f"1.2.3.{i}", f"1.2.3.{i}.1"
        studies.append({"study_uid": study, "patient_id": patient, "patient_sex": "F" if i < 5 else "M",
                        "patient_birth_date": "19600101" if i < 5 else "19500101", "study_date": "20250601"})
        series.append({"series_uid": uid, "study_uid": study, "patient_id": patient, "modality": "CT",
                       "body_part": "ABDOMEN", "manufacturer": "GE" if i < 6 else "Philips",
                       "instance_count": 10, "slice_thickness": 2.5 if i < 6 else 0.8})
        instances += [{"sop_instance_uid": f"{uid}.{k}", "series_uid": uid, "study_uid": study, "patient_id": patient,
                       "patient_name": f"Doe^Jane{i}", "modality": "CT", "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                       "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                       "ingested_at": dt.datetime(2026, 2, 27, 8, 30, 17 + k, tzinfo=dt.timezone.utc)} for k in range(10)]
    merge_rows(lake, STUDIES, studies)
    merge_rows(lake, SERIES, series)
    merge_rows(lake, INSTANCES, instances)
    merge_rows(lake, QUARANTINE, [{"sha256": f"{i:064x}", "reason": "not_dicom" if i < 6 else "truncated"}
                                  for i in range(7)])
    merge_rows(lake, COHORT_MEMBERS, [{"cohort": "c1", "cohort_version": v, "series_uid": f"1.2.3.{i}.1",
                                       "patient_id": f"PAT-{i:04d}"} for v, n in ((1, 3), (2, 6)) for i in range(n)])
    return lake


# -- dcmqi, 3D Slicer's SEG converter: an independent reader of our SEGs ----------------------

def segimage2itkimage() -> str:
    """The converter beside this interpreter (the venv's bin), else on PATH; skip if it cannot run."""
    found = Path(sys.executable).with_name("segimage2itkimage")
    binary = str(found) if found.exists() else shutil.which("segimage2itkimage")
    if binary is None:
        pytest.skip("dcmqi's segimage2itkimage is not installed (pip install dcmqi: the dev extra)")
    try:
        probe = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        pytest.skip(f"dcmqi's segimage2itkimage cannot run on this machine: {exc}")
    if probe.returncode != 0:
        pytest.skip(f"dcmqi's segimage2itkimage cannot run on this machine: {probe.stderr.strip()[:200]}")
    return binary


def dcmqi_labels(binary: str, seg_file: Path, ct_files: list[Path], out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(dcmqi's label volume resampled onto the CT's grid, our seg_labels on the same grid),
    both with dcmqi's label numbers."""
    import SimpleITK as sitk

    out.mkdir(parents=True)
    run = subprocess.run([binary, "--inputDICOM", str(seg_file), "--outputDirectory", str(out), "--outputType", "nifti",
                          "--prefix", "seg", "--mergeSegments"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    meta = json.loads((out / "seg-meta.json").read_text())
    images = sorted(out.glob("seg-*.nii.gz"))
    assert len(images) == len(meta["segmentAttributes"]) == 1, "non-overlapping segments merge into one volume"
    ids = {str(segment["SegmentLabel"]): int(segment["labelID"]) for segment in meta["segmentAttributes"][0]}
    volume = assemble_volume(ct_files)
    ours = seg_labels(seg_file, volume, ids)
    reference = volume.sitk_image(np.zeros(volume.hu.shape, np.uint8))
    # dcmqi writes the frames' extent in its own geometry: put it into the CT's voxels by patient
    # coordinates (nearest neighbour; both grids share spacing and direction, so it is exact).
    theirs = sitk.Resample(sitk.Cast(sitk.ReadImage(str(images[0])), sitk.sitkUInt8), reference,
                           sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(theirs), ours


@dataclass(frozen=True)
class Deployed:
    """One `kaapana` service of deploy/: its Deployment, Service, container and command line as
    `kaapana` parses it, beside the user code's Helm values it must agree with."""

    user_code: dict
    deployment: dict
    service: dict
    container: dict
    args: object  # argparse.Namespace

    @property
    def pod(self) -> dict:
        return self.deployment["spec"]["template"]["spec"]

    def home_mount(self) -> dict:
        """The `kaapana-home` mount, checked to be the user code's claim at the command's --home."""
        (mount,) = [m for m in self.container["volumeMounts"] if m["name"] == "kaapana-home"]
        assert mount["mountPath"] == self.args.home  # type: ignore[attr-defined]
        (volume,) = [v for v in self.pod["volumes"] if v["name"] == mount["name"]]
        (home_volume,) = [v for v in self.user_code["volumes"] if v["name"] == "kaapana-home"]
        assert volume["persistentVolumeClaim"] == home_volume["persistentVolumeClaim"]
        return mount

    def assert_environment_of_user_code(self, *names: str) -> None:
        env = {e["name"]: e["value"] for e in self.container["env"]}
        user_env = {e["name"]: e["value"] for e in self.user_code["env"]}
        for name in names:
            assert env[name] == user_env[name], name

    def assert_service_reaches_the_port(self) -> None:
        """The Service selects the pod and targets the port the command binds."""
        (port,) = self.container["ports"]
        assert port["containerPort"] == self.args.port  # type: ignore[attr-defined]
        assert self.service["spec"]["selector"].items() <= \
            self.deployment["spec"]["template"]["metadata"]["labels"].items()
        assert [p["targetPort"] for p in self.service["spec"]["ports"]] == [port["name"]]


def deployed(manifest: str) -> Deployed:
    """deploy/<manifest>, from the user code's image, its command parsed by `kaapana`'s parser."""
    import yaml

    from kaapana_assets.cli import build_parser

    values = yaml.safe_load((REPO / "deploy" / "values.yaml").read_text())
    (user_code,) = values["dagster-user-deployments"]["deployments"]
    documents = [d for d in yaml.safe_load_all((REPO / "deploy" / manifest).read_text()) if d]
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    (service,) = [d for d in documents if d["kind"] == "Service"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"{user_code['image']['repository']}:{user_code['image']['tag']}"
    command = container["command"] + container["args"]
    assert command[0] == "kaapana"
    return Deployed(user_code, deployment, service, container, build_parser().parse_args(command[1:]))
