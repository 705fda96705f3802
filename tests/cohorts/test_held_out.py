"""Issue #33: held-out test cohorts, blocking checks that hold across runs, cohort versions that
pin their slices, patient-level splits and a stable choice of the segmented series. Real DICOM,
real ingest, real Delta tables, real MLflow and real Dagster runs; only the last test trains
(it reuses the session's trained_site)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pydicom
import pytest

from bench.training_site import TRAIN_COHORT
from kaapana_assets.archive.service import Archive
from kaapana_assets.cohorts.definitions import CohortDefinition, CohortDefinitionError, parse_definition
from kaapana_assets.cohorts.membership import EmptyCohort, read_cohort, snapshot_cohort
from kaapana_assets.cohorts.tags import add_tag
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import COHORT_CHECKS, EVALUATIONS, FEDERATED_SITE_ROUNDS, INSTANCES, SERIES
from kaapana_assets.nnunet.registry import find_version
from kaapana_assets.synthetic import GeneratedStudy, generate_site

GRID = {"slices": 8, "matrix": 32}
SEED = 33


def define(**fields: object) -> CohortDefinition:
    return CohortDefinition.model_validate({"purpose": "test", "filter": {}, **fields})


def ingest(home: KaapanaHome, files: list[Path]) -> Lake:
    ingest_files(files, Archive.for_home(home), remove_sources=False)
    return Lake(home.lake)


def files_of(studies: list[GeneratedStudy]) -> list[Path]:
    return [f for s in studies for f in s.files]


@pytest.fixture(scope="module")
def site_a(tmp_path_factory: pytest.TempPathFactory) -> list[GeneratedStudy]:
    """Six annotated studies of site-a (read-only). Study 4 is the follow-up of patient
    SITE-A-0000 (study 0's patient): five patients, six studies."""
    studies = generate_site("site-a", 6, seed=SEED, out=tmp_path_factory.mktemp("site-a"), with_annotations=True,
                            **GRID)
    assert studies[4].patient_id == studies[0].patient_id == "SITE-A-0000"
    assert len({s.patient_id for s in studies}) == 5
    return studies


def dagster_site(home: KaapanaHome, definitions: dict[str, str]) -> dict:
    from resources import site_resources

    folder = home.root.parent / "cohorts"
    folder.mkdir(exist_ok=True)
    for name, text in definitions.items():
        (folder / f"{name}.yaml").write_text(text)
    return site_resources(home.root, folder, device="cpu", schedule="tiny", threads=1)


def failure(result: dg.ExecuteInProcessResult, node: str) -> str:
    data = result.failure_data_for_node(node)
    assert data is not None and data.error is not None, f"{node} did not fail"
    return data.error.message


# -- 3 · held out per patient -------------------------------------------------------------------


def test_exclude_cohorts_holds_out_patients_and_pins_the_version(tmp_path: Path, site_a: list[GeneratedStudy]) -> None:
    """`exclude_tags` leaves tagged series out; `exclude_cohorts` leaves out every series of a
    patient of the other cohort's latest version — a patient's second study too — and the
    snapshot records which version it read."""
    lake = ingest(KaapanaHome(tmp_path / "home").ensure(), files_of(site_a))
    first, follow_up = site_a[0], site_a[4]  # one patient, two studies
    add_tag(lake, "reviewed", [first.series_uid])
    train = define(name="train", purpose="train", filter={"modality": "CT", "exclude_tags": ["reviewed"]})
    test = define(name="test", filter={"modality": "CT", "tags": ["reviewed"], "exclude_cohorts": ["train"]})

    with pytest.raises(LookupError, match="excludes the patients of cohort 'train', which has no snapshot"):
        snapshot_cohort(lake, test)  # cut before its training cohort, it would hold nothing out
    v1 = snapshot_cohort(lake, train)
    assert first.series_uid not in v1.members["series_uid"].to_list()  # tagged: left out
    assert follow_up.series_uid in v1.members["series_uid"].to_list()  # the same patient's other study is not
    # The reviewed series' patient is a training patient (by the follow-up): nothing is held out.
    with pytest.raises(EmptyCohort, match="after leaving out 1 series of patients in train v1"):
        snapshot_cohort(lake, test)

    add_tag(lake, "reviewed", [follow_up.series_uid])  # the reviewer takes the whole patient
    v2 = snapshot_cohort(lake, train)
    held_out = snapshot_cohort(lake, test)
    assert v2.version == 2 and "SITE-A-0000" not in v2.patients
    assert held_out.patients == {"SITE-A-0000"} and not held_out.patients & v2.patients
    assert sorted(held_out.members["series_uid"]) == sorted([first.series_uid, follow_up.series_uid])
    assert held_out.excluded_cohorts == {"train": 2}
    assert read_cohort(lake, "test", held_out.version).excluded_cohorts == {"train": 2}  # pinned in the lake


def test_exclusion_is_validated() -> None:
    with pytest.raises(CohortDefinitionError, match="names the cohort itself"):
        parse_definition("name: t\npurpose: test\nfilter: {exclude_cohorts: [t]}")
    with pytest.raises(CohortDefinitionError) as bad_name:
        parse_definition("name: t\npurpose: test\nfilter: {exclude_cohorts: ['Liver Train']}")
    assert bad_name.value.field == "filter.exclude_cohorts"
    with pytest.raises(CohortDefinitionError) as bad_tag:
        parse_definition("name: t\npurpose: test\nfilter: {exclude_tags: ['bad tag']}")
    assert bad_tag.value.field == "filter.exclude_tags"


def test_the_shipped_test_cohort_is_held_out_from_the_training_cohort() -> None:
    from kaapana_assets.cohorts.definitions import EXAMPLES, load_definitions

    found, errors = load_definitions(EXAMPLES)
    assert not errors
    assert found["reviewed-test"].filter.exclude_cohorts == ["liver-train"]
    assert "reviewed" in found["liver-train"].filter.exclude_tags


def test_segmentation_evaluation_refuses_patients_the_model_trained_on(tmp_path: Path,
                                                                        site_a: list[GeneratedStudy]) -> None:
    """A model version whose MLflow lineage names liver-train v1: a test cohort with patients of
    liver-train v1 fails before the model is even fetched, naming the patients, the model
    version and the training cohort version."""
    from kaapana_assets.cohorts.assets import cohorts, harmonization_checks
    from kaapana_assets.evaluation.assets import segmentation_evaluation

    home = KaapanaHome(tmp_path / "home").ensure()
    lake = ingest(home, files_of(site_a[:3]))
    resources = dagster_site(home, {
        "liver-train": TRAIN_COHORT.replace("min_size: 4", "min_size: 3"),
        "overlapping": "name: overlapping\npurpose: test\nfilter: {modality: CT}\nharmonization: {min_size: 1}\n"})
    tracking = resources["mlflow"].tracking()
    # A version registered the way train_and_register registers one (its run's lineage tags).
    with tracking.run("train liver-train v1") as run:
        pass
    version = tracking.register(run.info.run_id, "model", "nnunet-liver-train",
                                tags={"kaapana.cohort": "liver-train", "kaapana.cohort_version": "1"})
    tracking.promote("nnunet-liver-train", version.version)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("cohorts", ["liver-train", "overlapping"])
        for name in ("liver-train", "overlapping"):
            assert dg.materialize([cohorts, *harmonization_checks], partition_key=name, instance=instance,
                                  resources=resources).success
        result = dg.materialize([segmentation_evaluation], partition_key="overlapping", instance=instance,
                                resources=resources, raise_on_error=False)
    message = failure(result, "segmentation_evaluation")
    assert f"cohort overlapping v1 is not held out from nnunet-liver-train:v{version.version}" in message
    assert "SITE-A-0000, SITE-A-0001, SITE-A-0002" in message and "(cohort liver-train v1)" in message
    assert "exclude_cohorts: [liver-train]" in message and "allow_overlap" in message
    assert not lake.exists(EVALUATIONS) and not (home.root / "models").exists()  # nothing measured or fetched


def test_a_federated_model_is_held_to_this_sites_rounds(tmp_path: Path, site_a: list[GeneratedStudy]) -> None:
    """A site records the cohort version it trained each round on (federated_site_rounds, in its
    own lake); a federated model is held to this site's versions of the rounds up to the one it
    was registered from."""
    from kaapana_assets.evaluation.held_out import NotHeldOut, check_held_out
    from kaapana_assets.federated.site import SiteContext, compute_fingerprint, record_round
    from kaapana_assets.federation.store import FederationStore
    from tests.helpers import COHORT

    home = KaapanaHome(tmp_path / "home").ensure()
    lake = ingest(home, files_of(site_a[:4]))
    store = FederationStore(home.site_federation)
    store.write_json("fed", "experiment", {"cohort": "liver-train", "labels": ["liver"]})
    ctx = SiteContext("site-a", store, lake, home.archive, home.root / "nnunet", device="cpu", threads=1,
                      log=lambda message: None)
    snapshot_cohort(lake, COHORT)
    compute_fingerprint(ctx, "fed")
    record_round(ctx, "fed", 1, cases=3)
    ingest(home, site_a[5].files)  # a new patient; the next export is liver-train v2
    snapshot_cohort(lake, COHORT)
    compute_fingerprint(ctx, "fed")
    record_round(ctx, "fed", 2, cases=4)
    rounds = lake.read(FEDERATED_SITE_ROUNDS).sort("round")
    assert rounds.select("round", "cohort", "cohort_version").rows() == [(1, "liver-train", 1), (2, "liver-train", 2)]

    add_tag(lake, "new", [site_a[5].series_uid])
    newcomer = snapshot_cohort(lake, define(name="newcomer", filter={"tags": ["new"]}))
    tags = {"kaapana.source": "federated", "kaapana.federated_experiment": "fed", "kaapana.cohort": "liver-train"}
    after_round_1 = check_held_out(lake, newcomer, "nnunet-liver-train:v1", {**tags, "kaapana.rounds": "1"})
    assert after_round_1.held_out and "liver-train v1 in round(s) 1 of federated experiment fed" in after_round_1.summary
    with pytest.raises(NotHeldOut, match=r"patient\(s\) SITE-A-0004 are in its training data \(this site's "
                       r"liver-train v1, liver-train v2 in round\(s\) 1, 2 of federated experiment fed\)"):
        check_held_out(lake, newcomer, "nnunet-liver-train:v2", {**tags, "kaapana.rounds": "2"})
    allowed = check_held_out(lake, newcomer, "nnunet-liver-train:v2", {**tags, "kaapana.rounds": "2"},
                             allow_overlap=True)
    assert allowed.overlap == ("SITE-A-0004",) and allowed.summary.startswith("IN-SAMPLE: 1 patient(s)")
    other = check_held_out(lake, newcomer, "m:v1", {**tags, "kaapana.federated_experiment": "elsewhere",
                                                   "kaapana.rounds": "3"})
    assert other.held_out  # an experiment this site never trained in has none of its patients


# -- 4 · blocking checks hold across runs -------------------------------------------------------


@pytest.mark.parametrize("check,annotated,count", [("minimum_size", True, 1), ("reference_segmentations", False, 4)])
def test_a_cohort_version_that_failed_a_blocking_check_is_not_exported(
        tmp_path: Path, check: str, annotated: bool, count: int) -> None:
    """The cohort run's blocking check fails; a later run of nnunet_dataset (another run: the
    check's block does not reach it) refuses the version, naming the check."""
    from kaapana_assets.cohorts.assets import cohorts, harmonization_checks
    from kaapana_assets.training.assets import nnunet_dataset

    home = KaapanaHome(tmp_path / "home").ensure()
    studies = generate_site("site-a", count, seed=SEED, out=tmp_path / "generated", with_annotations=annotated, **GRID)
    lake = ingest(home, files_of(studies))
    train = TRAIN_COHORT.replace("  has_reference_segmentation: true\n", "")  # unannotated series are members too
    resources = dagster_site(home, {"liver-train": train})
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("cohorts", ["liver-train"])
        checked = dg.materialize([cohorts, *harmonization_checks], partition_key="liver-train", instance=instance,
                                 resources=resources, raise_on_error=False)
        assert {e.check_name for e in checked.get_asset_check_evaluations() if not e.passed} == {check}
        result = dg.materialize([nnunet_dataset], partition_key="liver-train", instance=instance,
                                resources=resources, raise_on_error=False)
    message = failure(result, "nnunet_dataset")
    assert f"cohort liver-train v1 failed its blocking check(s) {check} (" in message
    recorded = lake.read(COHORT_CHECKS).filter(pl.col("check_name") == check).row(0, named=True)
    assert (recorded["cohort"], recorded["cohort_version"], recorded["passed"]) == ("liver-train", 1, False)
    assert not (home.root / "nnunet" / "liver-train").exists()  # nothing exported


# slow: a real nnU-Net export and plan (≈20 s) before the refusal it tests
@pytest.mark.slow
def test_training_refuses_a_version_whose_checks_failed_after_its_export(tmp_path: Path,
                                                                       site_a: list[GeneratedStudy]) -> None:
    """Exported while its checks passed; the checks run again on the same version (the definition
    now asks for more patients) and fail: trained_model refuses before training starts."""
    from kaapana_assets.cohorts.assets import cohorts, harmonization_checks
    from kaapana_assets.training.assets import nnunet_dataset, trained_model

    home = KaapanaHome(tmp_path / "home").ensure()
    ingest(home, files_of(site_a[:3]))
    resources = dagster_site(home, {"liver-train": TRAIN_COHORT.replace("min_size: 4", "min_size: 3")})
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("cohorts", ["liver-train"])
        assert dg.materialize([cohorts, *harmonization_checks, nnunet_dataset], partition_key="liver-train",
                              instance=instance, resources=resources).success
        (home.root.parent / "cohorts" / "liver-train.yaml").write_text(TRAIN_COHORT)  # min_size 4
        rechecked = dg.materialize([cohorts, *harmonization_checks], partition_key="liver-train", instance=instance,
                                   resources=resources, raise_on_error=False)
        assert rechecked.asset_materializations_for_node("cohorts")[0].metadata["cohort_version"].value == 1
        result = dg.materialize([trained_model], partition_key="liver-train", instance=instance,
                                resources=resources, raise_on_error=False)
    message = failure(result, "trained_model")
    assert "cohort liver-train v1 failed its blocking check(s) minimum_size (3 patient(s)" in message
    tracking = resources["mlflow"].tracking()
    assert tracking.client().search_registered_models() == []  # nothing trained or registered


# -- 5 · a version pins its slices ----------------------------------------------------------------


def test_an_export_reads_the_slices_its_version_pinned(tmp_path: Path, site_a: list[GeneratedStudy]) -> None:
    """Version 1 is cut while one slice of a member is still in transit; the slice arrives. An
    export of version 1 (and the client, the evaluation's reader and lineage) still has the
    slices version 1 had; version 2 has the new one."""
    import SimpleITK as sitk

    from kaapana_assets.client import Kaapana
    from kaapana_assets.evaluation.evaluate import archive_paths
    from kaapana_assets.lineage import Node, _cohort_node
    from kaapana_assets.training.export import export_cohort
    from tests.helpers import COHORT

    home = KaapanaHome(tmp_path / "home").ensure()
    late_study = site_a[1]
    late = sorted(late_study.ct_files)[-1]  # the last slice: the series has no gap without it
    lake = ingest(home, [f for f in files_of(site_a[1:3]) if f != late])
    v1 = snapshot_cohort(lake, COHORT)
    ingest(home, [late])

    def exported_slices(version: int) -> int:
        folder = tmp_path / f"export-v{version}"
        export_cohort(lake, home.archive, read_cohort(lake, "liver-train", version), folder, ["liver"])
        cases = {c["series_uid"]: c["case"] for c in json.loads((folder / "cases.json").read_text())}
        image = sitk.ReadImage(str(folder / "imagesTr" / f"{cases[late_study.series_uid]}_0000.nii.gz"))
        return sitk.GetArrayFromImage(image).shape[0]

    assert exported_slices(1) == GRID["slices"] - 1  # as version 1 was cut
    assert lake.version(INSTANCES) > v1.instances_table_version  # type: ignore[operator]
    v2 = snapshot_cohort(lake, COHORT)  # the series row changed: a new version
    assert v2.version == 2 and exported_slices(2) == GRID["slices"]
    assert exported_slices(1) == GRID["slices"] - 1  # and version 1 still exports what it did

    assert Kaapana(home.root).cohort("liver-train", version=1).case(late_study.series_uid).image.shape[0] == 7
    assert len(archive_paths(lake, home.archive, late_study.series_uid, v1.instances_table_version)) == 7
    node = Node("model")
    _cohort_node(node, lake, "liver-train", 1, "trained on")
    text = "\n".join(node.lines())
    assert f"instances v{v1.instances_table_version}" in text
    assert f"source series {late_study.series_uid}: 7 SOP instance(s)" in text


# -- 6 · patients, not series ---------------------------------------------------------------------


def test_one_patient_is_refused_before_nnunet_starts(tmp_path: Path, site_a: list[GeneratedStudy]) -> None:
    """Two studies of one patient: minimum_size counts one patient, and an export for training
    refuses before nnU-Net is started (no validation patient the model did not train on)."""
    from kaapana_assets.cohorts.assets import cohorts, harmonization_checks
    from kaapana_assets.cohorts.harmonization import minimum_size
    from kaapana_assets.training.assets import nnunet_dataset

    home = KaapanaHome(tmp_path / "home").ensure()
    lake = ingest(home, files_of([site_a[0], site_a[4]]))  # SITE-A-0000 twice
    one_patient = TRAIN_COHORT.replace("min_size: 4", "min_size: 1")
    resources = dagster_site(home, {"liver-train": one_patient})
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("cohorts", ["liver-train"])
        checked = dg.materialize([cohorts, *harmonization_checks], partition_key="liver-train", instance=instance,
                                 resources=resources)
        assert checked.success and checked.asset_materializations_for_node("cohorts")[0].metadata["series"].value == 2
        result = dg.materialize([nnunet_dataset], partition_key="liver-train", instance=instance,
                                resources=resources, raise_on_error=False)
    message = failure(result, "nnunet_dataset")
    assert "cohort liver-train v1 has 1 patient(s) (SITE-A-0000); training needs at least 2" in message
    assert not (home.root / "nnunet" / "liver-train").exists()  # nnU-Net never started

    two_series = minimum_size(read_cohort(lake, "liver-train"), parse_definition(TRAIN_COHORT.replace(
        "min_size: 4", "min_size: 2")))
    assert not two_series.passed and two_series.description.startswith("1 patient(s) in 2 series")


def test_the_split_keeps_a_patients_series_together(tmp_path: Path, site_a: list[GeneratedStudy]) -> None:
    """The split of a real export: patient SITE-A-0000's two series on one side, never both; with
    one patient there is no split at all."""
    from kaapana_assets.nnunet import patient_split
    from kaapana_assets.training.export import export_cohort
    from tests.helpers import COHORT

    home = KaapanaHome(tmp_path / "home").ensure()
    lake = ingest(home, files_of(site_a))
    folder = tmp_path / "export"
    export_cohort(lake, home.archive, snapshot_cohort(lake, COHORT), folder, ["liver"])
    cases = [(c["case"], c["patient_id"]) for c in json.loads((folder / "cases.json").read_text())]
    assert len(cases) == 6 and len({p for _, p in cases}) == 5
    split = patient_split(cases)
    side = {p: {("train" if c in split["train"] else "val") for c, q in cases if q == p} for _, p in cases}
    assert all(len(sides) == 1 for sides in side.values())  # no patient on both sides
    assert not set(split["train"]) & set(split["val"]) and split["val"] and split["train"]
    assert sorted(split["train"] + split["val"]) == sorted(c for c, _ in cases)
    assert patient_split(cases) == split  # deterministic
    two = [c for c in cases if c[1] == "SITE-A-0000"]
    assert len(two) == 2
    with pytest.raises(ValueError, match=r"1 patient\(s\) \(SITE-A-0000\); training needs at least 2"):
        patient_split(two)  # TooFewPatients: the validation case would be a training case


# -- 8 · which series is segmented ----------------------------------------------------------------


def _second_series(study: GeneratedStudy, out: Path, series_number: int) -> list[Path]:
    """A copy of the study's CT series in the same study: new series and SOP UIDs, its own
    SeriesNumber, everything else equal (complete, same slices, same thickness)."""
    out.mkdir(parents=True)
    written = []
    for path in study.ct_files:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.33.8.1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.33.8.2.{ds.InstanceNumber}"
        ds.SeriesNumber = series_number
        target = out / path.name
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def test_the_segmented_series_does_not_depend_on_row_order(tmp_path: Path, site_a: list[GeneratedStudy]) -> None:
    """Two equal candidate series in one study: the lower SeriesNumber is segmented, and with equal
    numbers the lower SeriesInstanceUID — whatever order the series rows come in."""
    from kaapana_assets.segmentation.segment import pick_source_series

    study = site_a[2]
    home = KaapanaHome(tmp_path / "home").ensure()
    lake = ingest(home, [*study.ct_files, *_second_series(study, tmp_path / "copy", series_number=7)])
    rows = lake.read(SERIES, pl.col("study_uid") == study.study_uid).filter(pl.col("modality") == "CT")
    assert rows.height == 2
    assert rows.select("complete", "instance_count", "slice_thickness").unique().height == 1  # equal candidates
    by_number = dict(zip(rows["series_number"].to_list(), rows["series_uid"].to_list(), strict=True))
    assert set(by_number) == {2, 7}
    same_number = rows.with_columns(pl.lit(2, pl.Int64).alias("series_number"))
    for order in itertools.permutations(range(rows.height)):
        assert pick_source_series(rows[list(order), :], study.study_uid)["series_uid"] == by_number[2]
        assert pick_source_series(same_number[list(order), :], study.study_uid)["series_uid"] == min(by_number.values())
    thinner = rows.with_columns(pl.when(pl.col("series_number") == 7).then(pl.col("slice_thickness") / 2)
                                .otherwise(pl.col("slice_thickness")).alias("slice_thickness"))
    for order in itertools.permutations(range(rows.height)):
        assert pick_source_series(thinner[list(order), :], study.study_uid)["series_uid"] == by_number[7]


# -- 3 · an in-sample report, deliberately (slow: the session's trained model) -------------------


@pytest.mark.slow  # the session's trained_site (nnU-Net trained once per session) and a prediction
@pytest.mark.timeout(900)
def test_an_in_sample_evaluation_must_be_asked_for_and_says_so(trained_site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The session's model was trained on liver-train v1; a test cohort of one of its training
    patients: segmentation_evaluation refuses; with allow_overlap it measures, and its report
    says in-sample in its title, MLflow and on the model version; it never promotes."""
    from kaapana_assets.cohorts.assets import cohorts, harmonization_checks
    from kaapana_assets.evaluation.assets import evaluated_promotion, segmentation_evaluation
    from resources import site_resources

    shutil.copytree(trained_site.home.root, tmp_path / "home", ignore=shutil.ignore_patterns("nnunet", "models"))
    home = KaapanaHome(tmp_path / "home")
    (tmp_path / "cohorts").mkdir()
    (tmp_path / "cohorts" / "in-sample.yaml").write_text(
        "name: in-sample\npurpose: test\nrequired_labels: [liver]\nfilter: {modality: CT, tags: [in-sample]}\n"
        "harmonization: {min_size: 1}\n")
    patient = trained_site.studies[1]
    add_tag(Lake(home.lake), "in-sample", [patient.series_uid])
    resources = site_resources(home.root, tmp_path / "cohorts", device="cpu", threads=2)
    production = find_version(resources["mlflow"].tracking(), "nnunet-liver-train")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("cohorts", ["in-sample"])
        assert dg.materialize([cohorts, *harmonization_checks], partition_key="in-sample", instance=instance,
                              resources=resources).success
        refused = dg.materialize([segmentation_evaluation], partition_key="in-sample", instance=instance,
                                 resources=resources, raise_on_error=False)
        message = failure(refused, "segmentation_evaluation")
        assert (f"not held out from nnunet-liver-train:v{production.version}: patient(s) {patient.patient_id} are in "
                "its training data (cohort liver-train v1)") in message

        asked = dg.materialize([segmentation_evaluation], partition_key="in-sample", instance=instance,
                               resources=resources, run_config={"ops": {"segmentation_evaluation": {
                                   "config": {"allow_overlap": True}}}})
        md = asked.asset_materializations_for_node("segmentation_evaluation")[0].metadata
        assert md["held_out"].value is False and md["in_sample_patients"].value == [patient.patient_id]
        assert md["cases"].value == 1
        assert md["boxplot"].value.startswith("![IN-SAMPLE, 1 patient(s) in the training data: nnunet-liver-train")
        run = resources["mlflow"].tracking().client().get_run(md["mlflow_run_id"].value)
        assert run.data.tags["kaapana.held_out"] == "false" and run.info.run_name.startswith("evaluate IN-SAMPLE")
        tag = resources["mlflow"].tracking().client().get_model_version(
            "nnunet-liver-train", production.version).tags["kaapana.evaluated_on.in-sample"]
        assert tag.endswith("(IN-SAMPLE: 1 patient(s) in its training data)")

        promoted = dg.materialize([evaluated_promotion], partition_key="in-sample", instance=instance,
                                  resources=resources, raise_on_error=False)
        assert "was evaluated in-sample" in failure(promoted, "evaluated_promotion")
