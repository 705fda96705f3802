"""Segmentation evaluation: the SimpleITK metrics on shapes of known size (fast), and the
segmentation_evaluation asset on the demo's federated model with a held-out test cohort
(slow: the session's demo)."""

from __future__ import annotations

import datetime as dt
import math
import re

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from kaapana_assets.cohorts.references import SegInstance, choose_references
from kaapana_assets.dicomweb.links import SegView, viewer_url
from kaapana_assets.environment import DEFAULT_VIEWER_URL
from kaapana_assets.evaluation.evaluate import evaluation_id
from kaapana_assets.evaluation.metrics import case_metrics, label_metrics
from kaapana_assets.evaluation.report import CaseResult, box_plot_png, case_results, gate, summarize
from kaapana_assets.lake.schemas import EVALUATIONS

# ---------------------------------------------------------------------------------------
# Metrics on spheres of known radius


def sphere(shape: tuple[int, int, int], spacing_zyx: tuple[float, float, float], centre_mm: tuple[float, float, float],
           radius_mm: float) -> np.ndarray:
    """Voxels (z, y, x) whose centres lie within `radius_mm` of `centre_mm`."""
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing_zyx, strict=True)], indexing="ij")
    return (z - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (x - centre_mm[2]) ** 2 <= radius_mm**2


def grid(spacing_zyx: tuple[float, float, float], extent_mm: float = 60.0) -> tuple[int, int, int]:
    return tuple(int(round(extent_mm / s)) for s in spacing_zyx)  # type: ignore[return-value]


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (2.5, 0.8, 0.8), (3.0, 1.0, 1.0)])
def test_concentric_spheres_are_4_mm_apart_at_any_spacing(spacing: tuple[float, float, float]) -> None:
    """Radii 10 and 14 mm: every surface point is 4 mm from the other surface, whatever the
    voxel spacing (up to one voxel of sampling); Dice is 2·10³/(10³+14³)."""
    shape = grid(spacing)
    inner = sphere(shape, spacing, (30, 30, 30), 10)
    outer = sphere(shape, spacing, (30, 30, 30), 14)
    m = label_metrics(inner, outer, spacing)
    tolerance = max(spacing)
    assert m.hd95_mm == pytest.approx(4.0, abs=tolerance)
    assert m.assd_mm == pytest.approx(4.0, abs=tolerance)
    assert m.hausdorff_mm == pytest.approx(4.0, abs=tolerance)
    assert m.dice == pytest.approx(2 * 10**3 / (10**3 + 14**3), abs=0.02)
    volume = 4 / 3 * math.pi  # ml per cm³ of radius
    assert m.reference_ml == pytest.approx(volume * 1.0**3, rel=0.08)
    assert m.predicted_ml == pytest.approx(volume * 1.4**3, rel=0.08)
    assert m.volume_difference_ml == pytest.approx(m.predicted_ml - m.reference_ml)
    assert m.assd_mm <= m.hd95_mm <= m.hausdorff_mm + 1e-6  # type: ignore[operator]


def test_distances_scale_with_voxel_spacing() -> None:
    """The same voxels at twice the spacing: every distance doubles, Dice does not change,
    volumes grow eightfold."""
    shape = grid((1.0, 1.0, 1.0))
    a, b = sphere(shape, (1, 1, 1), (30, 30, 30), 10), sphere(shape, (1, 1, 1), (31, 29, 30), 13)
    fine, coarse = label_metrics(a, b, (1.0, 1.0, 1.0)), label_metrics(a, b, (2.0, 2.0, 2.0))
    assert coarse.hd95_mm == pytest.approx(2 * fine.hd95_mm)  # type: ignore[operator]
    assert coarse.assd_mm == pytest.approx(2 * fine.assd_mm)  # type: ignore[operator]
    assert coarse.hausdorff_mm == pytest.approx(2 * fine.hausdorff_mm)  # type: ignore[operator]
    assert coarse.dice == pytest.approx(fine.dice)
    assert coarse.predicted_ml == pytest.approx(8 * fine.predicted_ml)
    # Anisotropic voxels (3 × 1 × 1 mm): a shift of two voxels is 6 mm along z, 2 mm along x.
    spacing = (3.0, 1.0, 1.0)
    ball = sphere(shape, spacing, (90, 30, 30), 15)
    along_z = label_metrics(ball, np.roll(ball, 2, axis=0), spacing)
    along_x = label_metrics(ball, np.roll(ball, 2, axis=2), spacing)
    assert along_z.hausdorff_mm == pytest.approx(6.0) and along_x.hausdorff_mm == pytest.approx(2.0)
    assert along_z.hd95_mm > along_x.hd95_mm  # type: ignore[operator]


@pytest.mark.parametrize("dz", [1.25, 2.5, 5.0])
def test_a_sphere_shifted_by_two_slices(dz: float) -> None:
    """A sphere moved two slices along z: the Hausdorff distance is the shift in mm, 2·dz."""
    spacing = (dz, 1.0, 1.0)
    shape = grid(spacing, 80)
    a = sphere(shape, spacing, (40, 30, 30), 15)
    b = sphere(shape, spacing, (40 + 2 * dz, 30, 30), 15)
    m = label_metrics(a, b, spacing)
    assert m.hausdorff_mm == pytest.approx(2 * dz, abs=1e-4)
    assert 0 < m.hd95_mm <= 2 * dz + 1e-4  # type: ignore[operator]
    assert m.dice is not None and m.dice < 1


def test_empty_and_identical_masks() -> None:
    shape, spacing = (20, 20, 20), (2.0, 1.0, 1.0)
    empty = np.zeros(shape, bool)
    ball = sphere(shape, spacing, (20, 10, 10), 6)
    both_empty = label_metrics(empty, empty, spacing)
    assert (both_empty.dice, both_empty.hd95_mm, both_empty.assd_mm, both_empty.hausdorff_mm) == (None,) * 4
    missed = label_metrics(ball, empty, spacing)
    assert missed.dice == 0.0 and missed.hd95_mm is None and missed.predicted_ml == 0.0
    assert missed.volume_difference_ml == pytest.approx(-ball.sum() * 2 / 1000)
    same = label_metrics(ball, ball, spacing)
    assert same.dice == 1.0 and same.hd95_mm == pytest.approx(0, abs=1e-5) and same.assd_mm == pytest.approx(0, abs=1e-5)
    with pytest.raises(ValueError, match="not on one grid"):
        label_metrics(ball, ball[:-1], spacing)


def test_case_metrics_measure_each_label() -> None:
    spacing = (1.0, 1.0, 1.0)
    truth = np.zeros((40, 40, 40), np.uint8)
    truth[sphere(truth.shape, spacing, (20, 20, 20), 12)] = 1
    truth[sphere(truth.shape, spacing, (20, 20, 20), 3)] = 2
    predicted = truth.copy()
    predicted[predicted == 2] = 1  # the lesion missed, counted as organ
    metrics = case_metrics(truth, predicted, spacing, {"background": 0, "liver": 1, "lesion": 2})
    assert set(metrics) == {"liver", "lesion"}
    assert 0.95 < metrics["liver"].dice < 1 and metrics["lesion"].dice == 0.0  # type: ignore[operator]


# ---------------------------------------------------------------------------------------
# Summary, plot and gate


def _rows(dice_liver: list[float | None], dice_lesion: list[float | None]) -> pl.DataFrame:
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for label, value, values in (("liver", 1, dice_liver), ("lesion", 2, dice_lesion)):
        for i, dice in enumerate(values):
            rows.append({"evaluation_id": "e", "cohort": "c", "cohort_version": 1, "model_name": "m",
                         "model_version": "1", "series_uid": f"1.2.{i}", "label": label, "label_value": value,
                         "dice": dice, "hd95_mm": None if dice is None else 10.0 * (1 - dice) + i,
                         "assd_mm": None if dice is None else 2.0, "volume_difference_ml": 5.0 - i,
                         "evaluated_at": now})
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=EVALUATIONS.schema))  # type: ignore[return-value]


def test_summary_and_gate() -> None:
    rows = _rows([0.9, 0.8, 0.7], [0.5, None, 0.0])
    summary = {s["label"]: s for s in summarize(rows)}
    assert list(summary) == ["liver", "lesion"]  # in label value order
    assert summary["liver"]["dice_mean"] == pytest.approx(0.8) and summary["liver"]["cases"] == 3
    assert summary["lesion"]["cases_with_dice"] == 2 and summary["lesion"]["dice_mean"] == pytest.approx(0.25)
    assert summary["liver"]["volume_difference_mean_abs_ml"] == pytest.approx(4.0)

    off = gate(summarize(rows), ["liver"])  # the default: open
    assert off.passed and "mean Dice ≥ 0" in off.description
    assert gate(summarize(rows), ["liver"], min_dice=0.75).passed
    strict = gate(summarize(rows), ["liver"], min_dice=0.85)
    assert not strict.passed and "liver: mean Dice 0.800 < 0.85" in strict.description
    hd = gate(summarize(rows), ["liver"], max_hd95_mm=2.0)
    assert not hd.passed and "median HD95" in hd.description
    assert not gate(summarize(rows), [], min_dice=0.5).passed  # no required labels: every label, lesion fails
    assert not gate(summarize(rows), ["spleen"]).passed  # a required label nobody measured

    png = box_plot_png(rows, "title")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_rows_per_case_and_label_become_one_result_per_case() -> None:
    """What the per-case table (and its viewer links) is made of: one result per CT series, with
    the SEG the model made, the distinct reference SEGs, and Dice per label (null kept)."""
    row = {"patient_id": "P1", "study_uid": "1.1", "predicted_seg_series_uid": "1.1.9"}
    rows = pl.DataFrame([
        {**row, "series_uid": "1.1.1", "label": "spleen", "label_value": 2, "dice": None, "reference_seg_series_uid": "1.1.7"},
        {**row, "series_uid": "1.1.1", "label": "liver", "label_value": 1, "dice": 0.9, "reference_seg_series_uid": "1.1.7"},
        {"patient_id": None, "study_uid": "1.0", "predicted_seg_series_uid": "1.0.9", "series_uid": "1.0.1",
         "label": "liver", "label_value": 1, "dice": 0.5, "reference_seg_series_uid": "1.0.7"},
    ])
    assert case_results(rows) == [
        CaseResult("", "1.0", "1.0.1", "1.0.9", ("1.0.7",), {"liver": 0.5}),
        CaseResult("P1", "1.1", "1.1.1", "1.1.9", ("1.1.7",), {"liver": 0.9, "spleen": None}),
    ]


def test_reference_is_never_a_model_output() -> None:
    """The policy the evaluation reads its references by (cohorts/references.py): our own
    model's SEG is none, whatever its algorithm type; the others give their labels."""

    def seg(uid: str, by_platform: bool = False, kind: str = "MANUAL") -> SegInstance:
        return SegInstance(uid, uid + ".0", frozenset({"liver"}), frozenset({kind}), by_platform, "")

    manual = ["MANUAL", "SEMIAUTOMATIC"]
    assert choose_references([seg("1.2.9"), seg("1.2.3"), seg("1.2.5")], manual).sources[0].seg_sop_instance_uid == "1.2.3"
    assert choose_references([seg("1.2.3", by_platform=True), seg("1.2.5")], manual).seg_series_uids == ("1.2.5.0",)
    refs = choose_references([seg("1.2.3", True, "AUTOMATIC"), seg("1.2.5", kind="AUTOMATIC")], [*manual, "AUTOMATIC"])
    assert refs.seg_series_uids == ("1.2.5.0",)
    assert choose_references([seg("1.2.3", True, "AUTOMATIC"), seg("1.2.5", kind="AUTOMATIC")], manual).sources == ()
    assert evaluation_id("c", 1, "m", "1") != evaluation_id("c", 2, "m", "1")
    assert len(evaluation_id("c", 1, "m", "1")) == 16


# ---------------------------------------------------------------------------------------
# The demo's federated model on a held-out test cohort, through Dagster (slow)


@pytest.mark.slow  # the session's demo (federated nnU-Net) and predictions
@pytest.mark.timeout(1500)
def test_evaluation_of_the_demo_federated_model(evaluated_demo) -> None:  # type: ignore[no-untyped-def]
    from kaapana_assets.lake import Lake
    from kaapana_assets.nnunet.registry import find_version

    result = evaluated_demo.result
    assert result.success
    md = result.asset_materializations_for_node("segmentation_evaluation")[0].metadata
    assert md["cases"].value == 6 and md["cohort_version"].value == 1
    assert "data:image/png;base64," in md["boxplot"].value
    tracking = evaluated_demo.resources["mlflow"].tracking()
    production = find_version(tracking, "nnunet-liver-train")
    assert production.tags["kaapana.source"] == "federated"
    assert md["model_version"].value == str(production.version)

    rows = Lake(evaluated_demo.home.lake).read(EVALUATIONS, pl.col("evaluation_id") == md["evaluation_id"].value)
    assert rows.height == 6 * len(md["labels"].value)
    assert set(rows["series_uid"]) == {s.series_uid for s in evaluated_demo.studies}
    # The per-case table links each case into the viewer, in series order: its study with the
    # model's SEG, then with its reference SEG.
    links = re.findall(r"\]\(([^)]+)\)", md["cases_in_viewer"].value)
    cases = rows.filter(pl.col("label") == "liver").sort("series_uid")
    assert links == [viewer_url(DEFAULT_VIEWER_URL, case["study_uid"], SegView(seg, case["series_uid"]))
                     for case in cases.iter_rows(named=True)
                     for seg in (case["predicted_seg_series_uid"], case["reference_seg_series_uid"])]
    # Values in range: Dice in [0, 1]; distances ≥ 0, ASSD ≤ HD95 ≤ HD; spacing of the grid.
    liver = rows.filter(pl.col("label") == "liver")
    assert liver["dice"].is_between(0, 1).all() and liver["dice"].null_count() == 0
    assert (liver["hd95_mm"] >= 0).all() and (liver["assd_mm"] <= liver["hd95_mm"] + 1e-6).all()
    assert (liver["hd95_mm"] <= liver["hausdorff_mm"] + 1e-6).all()
    assert all(len(s) == 3 and min(s) > 0 for s in rows["spacing_zyx"].to_list())
    assert (liver["reference_ml"] > 0).all()
    # Consistent with the validation Dice the model was registered with (the sites' own
    # validation patients, cross-site): within 0.1.
    validation = float(production.tags["kaapana.validation_dice"])
    test_dice = float(liver["dice"].mean())  # type: ignore[arg-type]
    print(f"\nheld-out liver Dice {test_dice:.3f} (median HD95 {liver['hd95_mm'].median():.1f} mm, mean ASSD "
          f"{liver['assd_mm'].mean():.2f} mm) vs MLflow validation Dice {validation:.3f}; evaluation run "
          f"{evaluated_demo.seconds:.1f} s")
    assert abs(test_dice - validation) <= 0.1

    # The gate ran, open by default; MLflow has the run, the model version names the cohort version.
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == "evaluation_gate" and check.passed
    run = tracking.client().get_run(md["mlflow_run_id"].value)
    assert run.data.metrics["test_dice_mean_liver"] == pytest.approx(test_dice, abs=1e-3)
    assert run.data.tags["kaapana.evaluation_id"] == md["evaluation_id"].value
    artifacts = {a.path for a in tracking.client().list_artifacts(run.info.run_id, "evaluation")}
    assert artifacts == {"evaluation/boxplot.png", "evaluation/evaluations.csv"}
    tag = tracking.client().get_model_version("nnunet-liver-train", production.version).tags[
        "kaapana.evaluated_on.liver-test"]
    assert tag.startswith("v1: evaluation " + md["evaluation_id"].value)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_lineage_of_an_evaluation(evaluated_demo, capsys: pytest.CaptureFixture) -> None:  # type: ignore[no-untyped-def]
    from kaapana_assets.cli import main
    from kaapana_assets.lake import Lake

    md = evaluated_demo.result.asset_materializations_for_node("segmentation_evaluation")[0].metadata
    ident, version = md["evaluation_id"].value, md["model_version"].value
    home = str(evaluated_demo.home.root)
    capsys.readouterr()
    assert main(["lineage", ident, "--home", home]) == 0
    # The tree's guides out: rich wraps a long line and prefixes its continuation with them.
    out = " ".join(re.sub("[│├└─]", " ", capsys.readouterr().out).split())
    assert f"evaluation {ident}: model nnunet-liver-train v{version} on cohort liver-test v1, 6 case(s)" in out
    assert "measured on: cohort liver-test v1 of project admin, 6 series" in out
    assert "Delta versions read: series v" in out and ", series_projects v" in out
    assert "federated experiment liver-fed" in out
    assert all(s.series_uid in out for s in evaluated_demo.studies)
    # On the model, by version or alias: which cohort version it was measured on.
    for ref in (f"nnunet-liver-train:v{version}", "nnunet-liver-train:production"):
        assert main(["lineage", ref, "--home", home]) == 0
        # Without the tree's rules: the demo's own evaluation (reviewed-test) is listed after this one.
        out = " ".join(capsys.readouterr().out.replace("│", " ").split())
        assert f"evaluated on cohort liver-test v1 (evaluation {ident}): 6 case(s), mean Dice liver" in out
    # And on one of the SEGs it measured.
    seg = Lake(evaluated_demo.home.lake).read(EVALUATIONS)["predicted_seg_sop_instance_uid"][0]
    assert main(["lineage", seg, "--home", home]) == 0
    assert "evaluated on cohort liver-test v1" in " ".join(capsys.readouterr().out.split())
    assert main(["lineage", "nnunet-liver-train:v99", "--home", home]) == 2  # not registered: a clear error


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_gate_holds_back_promotion(evaluated_demo) -> None:  # type: ignore[no-untyped-def]
    """evaluate_and_promote: a gate the model fails blocks evaluated_promotion; a version that
    passes is promoted. The production alias is restored afterwards."""
    from kaapana_assets.evaluation import assets as evaluation
    from kaapana_assets.lake import Lake
    from kaapana_assets.nnunet.registry import find_version

    tracking = evaluated_demo.resources["mlflow"].tracking()
    production = find_version(tracking, "nnunet-liver-train")
    job = dg.Definitions(assets=evaluation.defs.assets, asset_checks=evaluation.defs.asset_checks,
                         jobs=evaluation.defs.jobs, resources=evaluated_demo.resources).resolve_job_def("evaluate_and_promote")

    def run(config: dict):  # type: ignore[no-untyped-def]
        return job.execute_in_process(partition_key="liver-test", instance=evaluated_demo.instance, raise_on_error=False,
                                      run_config={"ops": {"segmentation_evaluation": {"config": config}}})

    strict = run({"min_dice": 0.99})
    [check] = strict.get_asset_check_evaluations()
    assert not check.passed and "liver: mean Dice" in (check.description or "")
    assert not strict.asset_materializations_for_node("evaluated_promotion")  # blocked
    assert find_version(tracking, "nnunet-liver-train").version == production.version

    # A new version of the same weights, evaluated and promoted through the gate.
    candidate = tracking.register(production.run_id, "model", "nnunet-liver-train", tags={"kaapana.source": "test"})
    try:
        passed = run({"model_version": str(candidate.version), "min_dice": 0.2, "max_hd95_mm": 200.0})
        assert passed.success
        [check] = passed.get_asset_check_evaluations()
        assert check.passed
        promoted = passed.asset_materializations_for_node("evaluated_promotion")[0].metadata
        assert promoted["model_version"].value == str(candidate.version)
        assert promoted["previous_version"].value == str(production.version)
        assert find_version(tracking, "nnunet-liver-train").version == candidate.version
        # The same weights score the same on the same cohort version.
        rows = Lake(evaluated_demo.home.lake).read(EVALUATIONS, (pl.col("label") == "liver")
                                                    & (pl.col("cohort") == "liver-test"))  # not the demo's own
        by_version = rows.group_by("model_version").agg(pl.col("dice").mean()).sort("model_version")
        assert by_version["dice"].to_list()[0] == pytest.approx(by_version["dice"].to_list()[1], abs=1e-6)
    finally:
        tracking.promote("nnunet-liver-train", production.version)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_client_evaluates_with_the_same_code(evaluated_demo) -> None:  # type: ignore[no-untyped-def]
    """cohort.evaluate() (what the notebook runs when a cohort was never evaluated) is the
    asset's evaluation: the same rows, so the MERGE commits nothing new."""
    from kaapana_assets.client import Kaapana
    from kaapana_assets.lake import Lake

    md = evaluated_demo.result.asset_materializations_for_node("segmentation_evaluation")[0].metadata
    lake = Lake(evaluated_demo.home.lake)
    before = lake.version(EVALUATIONS)
    rows = Kaapana(evaluated_demo.home.root, cohorts=evaluated_demo.cohorts).cohort("liver-test").evaluate(
        model_version=md["model_version"].value, device="cpu")
    recorded = lake.read(EVALUATIONS, pl.col("evaluation_id") == md["evaluation_id"].value).sort(
        "series_uid", "label_value")
    assert rows.drop("evaluated_at").equals(recorded.drop("evaluated_at"))
    assert lake.version(EVALUATIONS) == before
