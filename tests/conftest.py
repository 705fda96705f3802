"""Shared fixtures. Generated data lives in tmp paths; expensive corpora are made once per session."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests never reach the network and never phone home.
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.s3_server import S3Server  # noqa: E402
from bench.training_site import TRAIN_COHORT, TRAIN_GRID  # noqa: E402
from kaapana_assets.archive.service import Archive  # noqa: E402
from kaapana_assets.cohorts.membership import snapshot_cohort  # noqa: E402
from kaapana_assets.federation.keys import generate_site_key  # noqa: E402
from kaapana_assets.home import KaapanaHome  # noqa: E402
from kaapana_assets.ingest.pipeline import ingest_files  # noqa: E402
from kaapana_assets.lake import Lake  # noqa: E402
from kaapana_assets.synthetic import GeneratedStudy, generate_site  # noqa: E402
from tests.helpers import (  # noqa: E402
    COHORT,
    REPO,
    SITES,
    SMALL,
    EncodedCorpus,
    Federation,
    TrainedSite,
)
from tests.tools import require  # noqa: E402


# Session fixtures too costly to build twice (the demo, a trained model, the three sites'
# homes): under pytest-xdist (`make test-all` runs two workers, --dist loadgroup) every test
# that uses one runs in the same worker, so each is built once per run.
def _shared_fixture_group(item: pytest.Item) -> str | None:
    names = getattr(item, "fixturenames", ())
    for fixture in ("demo_home", "trained_site", "federation", "gateway_site", "s3_server"):
        if fixture in names:
            return "demo" if fixture == "demo_home" else fixture
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = _shared_fixture_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.tools("storescu", …)`: the test fails in one line when a tool is missing."""
    for marker in item.iter_markers("tools"):
        require(*marker.args)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 API (moto's server) on loopback, one bucket; each test takes its own prefix."""
    server = S3Server(log=tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


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
def targets(home: KaapanaHome) -> Archive:
    return Archive.for_home(home)


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
    require(*sorted({e.tool for e in ENCODINGS}))
    for encoding in ENCODINGS:
        series[encoding.name] = [transcode(f, root / encoding.name / "ct" / f.name, encoding) for f in study.ct_files]
        if not encoding.transfer_syntax.startswith("1.2.840.10008.1.2.4") and encoding.name != "rle":
            segs[encoding.name] = transcode(study.seg_file, root / encoding.name / "seg" / study.seg_file.name, encoding)
    return EncodedCorpus(study, root, series, segs)


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

    ingest_files([f for s in studies for f in s.files], Archive.for_home(home), remove_sources=False)
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
        ingest_files([f for s in studies for f in s.files], Archive.for_home(home), remove_sources=False)
        snapshot_cohort(Lake(home.lake), COHORT)
        homes[site], keys[site] = home, generate_site_key()
    return Federation(root, homes, keys)


# A held-out test cohort at the demo's hub: annotated studies of all three scanners that no
# model trained on, tagged by a curator.
HELD_OUT_TAG = "held-out"
HELD_OUT = {"seed": 91, "first_index": 800, "per_site": 2}
TEST_COHORT = f"""name: liver-test
description: Held-out annotated studies of three scanners, for evaluation.
purpose: test
required_labels: [liver]
filter:
  modality: CT
  tags: [{HELD_OUT_TAG}]
  has_reference_segmentation: true
harmonization:
  slice_thickness_tolerance_mm: 5.0
  pixel_spacing_tolerance_mm: 2.0
  min_size: 6
"""


@dataclass
class EvaluatedDemo:
    """A copy of the demo's hub with six held-out annotated studies, the liver-test cohort
    and segmentation_evaluation[liver-test] of the demo's federated model, run through Dagster."""

    root: Path  # the copy: kaapana/ (KAAPANA_HOME), cohorts/
    studies: list[GeneratedStudy]
    instance: object  # the Dagster instance the runs are recorded in
    resources: dict
    result: object  # ExecuteInProcessResult of segmentation_evaluation + evaluation_gate
    seconds: float  # the evaluation run's wall time

    @property
    def home(self) -> KaapanaHome:
        return KaapanaHome(self.root / "kaapana")

    @property
    def cohorts(self) -> Path:
        return self.root / "cohorts"


DEMO_GRID = {"slices": 16, "matrix": 40}  # what demo_home passes to `kaapana demo`


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`kaapana demo` once on small grids with the tiny schedule and one local epoch per
    round (`make demo`: two; the tests check the rounds, their improvement, promotion and
    evaluation, not how far a round trains): the whole story; what it printed in demo.out."""
    from kaapana_assets.cli import main
    from kaapana_assets.cohorts.definitions import EXAMPLES

    root = tmp_path_factory.mktemp("demo")
    # The examples, with liver-train relaxed for 16-slice test grids (thicker slices than 5 mm).
    shutil.copytree(EXAMPLES, root / "cohorts")
    # It leaves the reviewed patient out, as the shipped liver-train does (reviewed-test is held out).
    (root / "cohorts" / "liver-train.yaml").write_text(TRAIN_COHORT.replace("min_size: 4", "min_size: 2").replace(
        "  has_reference_segmentation: true\n", "  has_reference_segmentation: true\n  exclude_tags: [reviewed]\n"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KAAPANA_COHORTS", str(root / "cohorts"))
        mp.setenv("KAAPANA_HOME", str(root / "kaapana"))
        mp.setenv("DAGSTER_HOME", str(root / "dagster"))
        mp.delenv("KAAPANA_FEDERATION", raising=False)
        # What the demo prints is kept beside its home (demo.out), for the tests that read it.
        with (root / "demo.out").open("w") as out, redirect_stdout(out):
            code = main(["demo", "--studies", "3", "--rounds", "3", "--new-studies", "1",
                         "--slices", str(DEMO_GRID["slices"]), "--matrix", str(DEMO_GRID["matrix"]),
                         "--schedule", "tiny", "--local-epochs", "1", "--promotion-dice", "0.2"])
    (root / "exit_code").write_text(str(code))
    return root


@pytest.fixture(scope="session")
def evaluated_demo(demo_home: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The demo's hub copied (demo_home stays as the demo left it), six held-out annotated
    studies (two per scanner) ingested and tagged, the liver-test cohort materialized with
    its checks, and segmentation_evaluation[liver-test] of the demo's production (federated)
    model with its gate, through Dagster. The copy's MLflow store still names demo_home's
    artifact folder (MLflow records absolute artifact URIs), where the evaluation's MLflow
    run puts its plot and rows."""
    import time

    import dagster as dg

    from kaapana_assets.cohorts.assets import cohorts, harmonization_checks
    from kaapana_assets.cohorts.tags import add_tag
    from kaapana_assets.evaluation.assets import evaluation_gate, segmentation_evaluation
    from resources import site_resources

    assert (demo_home / "exit_code").read_text() == "0", "the demo failed"
    root = tmp_path_factory.mktemp("evaluated")
    # What the hub's lineage and evaluation read; not the other sites, the Flower state or caches.
    shutil.copytree(demo_home / "kaapana", root / "kaapana",
                    ignore=shutil.ignore_patterns("sites", "federation", "flower", "flwr", "models", "dagster"))
    shutil.copytree(demo_home / "cohorts", root / "cohorts")
    (root / "cohorts" / "liver-test.yaml").write_text(TEST_COHORT)
    home = KaapanaHome(root / "kaapana")
    studies = [study for site in SITES for study in generate_site(
        site, HELD_OUT["per_site"], seed=HELD_OUT["seed"], out=root / "held-out", with_annotations=True,
        first_index=HELD_OUT["first_index"], **DEMO_GRID)]
    ingest_files([f for s in studies for f in s.files], Archive.for_home(home), remove_sources=False)
    add_tag(Lake(home.lake), HELD_OUT_TAG, [s.series_uid for s in studies])
    resources = site_resources(home.root, root / "cohorts", device="cpu", threads=2)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("cohorts", ["liver-test"])
        cohort_run = dg.materialize([cohorts, *harmonization_checks], partition_key="liver-test", instance=instance,
                                    resources=resources)
        assert cohort_run.success and all(e.passed for e in cohort_run.get_asset_check_evaluations())
        started = time.perf_counter()
        result = dg.materialize([segmentation_evaluation, evaluation_gate], partition_key="liver-test",
                                instance=instance, resources=resources)
        yield EvaluatedDemo(root, studies, instance, resources, result, time.perf_counter() - started)


@pytest.fixture
def flower_run() -> None:
    """Flower builds a Message only inside a run (it stamps run and node ids); here, run 1 on node 1."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1  # type: ignore[misc]
    TaskIdentity.node_id = 1  # type: ignore[misc]
    TaskIdentity.task_id = 1  # type: ignore[misc]


@pytest.fixture(scope="session")
def gateway_site(corpus: dict[str, list[GeneratedStudy]], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """tests/oidc.py GatewaySite: the provider, DICOMweb and the gateway, once per session."""
    import secrets

    import pyarrow as pa

    from bench.dicomweb_server import DicomwebServer
    from bench.gateway_server import GatewayServer
    from kaapana_assets.federation.local import free_port
    from kaapana_assets.lake.schemas import SERIES, SERIES_PROJECTS
    from tests.oidc import (
        AUDIENCE,
        CLIENT_ID,
        CLIENT_SECRET,
        COHORT_A,
        COHORT_B,
        PROJECT_A,
        PROJECT_B,
        SCOPE,
        GatewaySite,
        cohort_yaml,
        running_provider,
    )

    root = tmp_path_factory.mktemp("gateway")
    with running_provider() as provider:
        home = KaapanaHome(root / "home").ensure()
        study_a, study_b = corpus["site-a"][:2]
        report = ingest_files(study_a.files + study_b.files, Archive.for_home(home), remove_sources=False)
        assert report.count("indexed") == len(study_a.files + study_b.files), report.summary()
        lake = Lake(home.lake)
        series = lake.read(SERIES)
        by_study = {uid: sorted(series.filter(series["study_uid"] == uid)["series_uid"].to_list())
                    for uid in (study_a.study_uid, study_b.study_uid)}
        lake.merge(SERIES_PROJECTS, pa.Table.from_pylist([
            {"series_uid": s, "study_uid": study, "project": project, "assigned_by": "operator",
             "assigned_at": dt.datetime.now(dt.UTC)}
            for study, project in ((study_a.study_uid, PROJECT_A), (study_b.study_uid, PROJECT_B))
            for s in by_study[study]], schema=SERIES_PROJECTS.schema))
        cohorts = root / "cohorts"
        cohorts.mkdir()
        for name, project in ((COHORT_A, PROJECT_A), (COHORT_B, PROJECT_B)):
            (cohorts / f"{name}.yaml").write_text(cohort_yaml(name, project))
        identity_secret = root / "identity-secret"
        identity_secret.write_text(secrets.token_urlsafe(32))
        viewer = REPO / "build" / "ohif" / "dist"
        dicomweb = DicomwebServer(home.root, ("--identity-secret-file", str(identity_secret),
                                              *(("--viewer", str(viewer)) if (viewer / "index.html").is_file() else ())))
        dagster_port, dagster_read_only_port = free_port(), free_port()
        try:
            gateway = GatewayServer(root / "gateway", home.root, provider.issuer, CLIENT_ID, CLIENT_SECRET, AUDIENCE,
                                    {"dagster": f"http://127.0.0.1:{dagster_port}",
                                     "dagster-read-only": f"http://127.0.0.1:{dagster_read_only_port}",
                                     "dicomweb": f"http://127.0.0.1:{dicomweb.port}"},
                                    identity_secret, scope=SCOPE, viewer=True, cohorts=cohorts)
            try:
                yield GatewaySite(provider, home.root, study_a.study_uid, study_b.study_uid,
                                  by_study[study_a.study_uid], by_study[study_b.study_uid], dicomweb.url, gateway.url,
                                  gateway.viewer_url, dagster_port, dagster_read_only_port, cohorts, identity_secret.read_text().encode(), {})
            finally:
                gateway.stop()
        finally:
            dicomweb.stop()
