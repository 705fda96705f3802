"""What of a federated evaluation leaves a site and what the hub makes of it, on built
per-case rows: aggregates only, small cells suppressed (and refused at the hub when not),
the box plot from summaries alone, NVIDIA FLARE's cross_val_results.json layout and the
cross-site answer. The real run over Flower: tests/federated/test_federated.py."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from kaapana_assets.federated.evaluation_hub import (
    EvaluationRequest,
    answer,
    box_plot_png,
    cells,
    cross_val_results,
    evaluation_rows,
    heat_map_png,
    matrix_rows,
)
from kaapana_assets.federated.site_evaluation import (
    GLOBAL,
    EvaluationRefused,
    Metric,
    ModelEvaluation,
    parse_evaluation,
    summarize_rows,
)
from kaapana_assets.lake.schemas import CROSS_SITE_EVALUATIONS, FEDERATED_EVALUATIONS

PNG = b"\x89PNG\r\n\x1a\n"


def _rows(dice: list[float | None], label: str = "liver") -> list[dict]:
    """segmentation_evaluation-style per-case rows (evaluate.metric_row's columns)."""
    return [{"case": f"case{i:04d}", "label": label, "dice": d, "hd95_mm": None if d is None else 10 * (1 - d),
             "assd_mm": None if d is None else 2 * (1 - d), "reference_ml": 100.0 + i, "predicted_ml": 95.0 + i,
             "volume_difference_ml": -5.0} for i, d in enumerate(dice)]


def _evaluation(site: str, model: str, dice: list[float | None], threshold: int = 5) -> ModelEvaluation:
    return ModelEvaluation(site, model, "liver-test", 1, threshold, "held out",
                           tuple(summarize_rows(_rows(dice), ["liver"], threshold)))


def test_aggregates_only_and_small_cells_suppressed() -> None:
    dice = [0.9, 0.8, 0.85, 0.2, 0.95, 0.88, None]  # one case where Dice is undefined (both masks empty)
    [summary] = [s for s in summarize_rows(_rows(dice), ["liver"], 5) if s.metric is Metric.DICE]
    values = np.array([d for d in dice if d is not None])
    assert summary.cases == 6 and summary.reported == "6" and not summary.suppressed
    assert summary.mean == pytest.approx(values.mean()) and summary.median == pytest.approx(np.median(values))
    assert (summary.q1, summary.q3) == pytest.approx(tuple(np.percentile(values, [25, 75])))
    assert (summary.minimum, summary.maximum) == (0.2, 0.95)
    # 0.2 lies beyond 1.5 IQR below the box: the whisker stops at the lowest value within it.
    assert summary.whislo == 0.8 and summary.whishi == 0.95
    few = summarize_rows(_rows([0.9, 0.8, 0.7, 0.6]), ["liver"], 5)
    assert len(few) == len(Metric) and all(s.suppressed and s.reported == "<5" for s in few)
    assert all(getattr(s, k) is None for s in few for k in ("mean", "median", "q1", "q3", "minimum", "maximum"))

    # What the site sends: one JSON document of aggregates, no case names, no per-case value.
    sent = _evaluation("site-a", GLOBAL, dice).dumps()
    assert "case0" not in sent and "0.88" not in sent
    assert parse_evaluation(sent, "site-a", GLOBAL, 5) == _evaluation("site-a", GLOBAL, dice)


def test_the_hub_refuses_a_small_count_in_the_clear() -> None:
    honest = _evaluation("site-a", GLOBAL, [0.9, 0.8, 0.7, 0.6, 0.5]).to_json()
    leaky = _evaluation("site-a", GLOBAL, [0.9, 0.8, 0.7], threshold=2).to_json()
    with pytest.raises(EvaluationRefused, match="threshold 2"):
        parse_evaluation(json.dumps(leaky), "site-a", GLOBAL, 5)
    leaky["threshold"] = 5
    with pytest.raises(EvaluationRefused, match="3 cases in the clear, below 5"):
        parse_evaluation(json.dumps(leaky), "site-a", GLOBAL, 5)
    smuggled = json.loads(json.dumps(_evaluation("site-a", GLOBAL, [0.9, 0.8]).to_json()))
    smuggled["summaries"][0]["mean"] = 0.85
    with pytest.raises(EvaluationRefused, match="suppressed cell carries values"):
        parse_evaluation(json.dumps(smuggled), "site-a", GLOBAL, 5)
    with pytest.raises(EvaluationRefused, match="expected 'global' at 'site-b'"):
        parse_evaluation(json.dumps(honest), "site-b", GLOBAL, 5)
    with pytest.raises(EvaluationRefused, match="expected 'site-a' at 'site-a'"):
        parse_evaluation(json.dumps(honest), "site-a", "site-a", 5)


def test_table_rows_and_box_plot_from_summaries() -> None:
    evaluations = [_evaluation("site-a", GLOBAL, [0.9, 0.8, 0.85, 0.7, 0.95]), _evaluation("site-b", GLOBAL, [0.9])]
    rows = evaluation_rows("liver-fed", 3, evaluations)
    table = pa.Table.from_pylist(rows, schema=FEDERATED_EVALUATIONS.schema)
    assert table.num_rows == 2 * len(Metric)
    b = [r for r in rows if r["site"] == "site-b"]
    assert all(r["suppressed"] and r["cases"] is None and r["mean"] is None and r["reported"] == "<5" for r in b)
    assert {r["model"] for r in rows} == {"liver-fed:global@round3"}
    for evaluation in evaluations:  # the suppressed site's plot draws no box and says why
        assert box_plot_png(evaluation).startswith(PNG)


def test_cross_site_matrix_nvflare_layout_and_answer() -> None:
    evaluations = [
        _evaluation("site-a", GLOBAL, [0.9] * 5), _evaluation("site-a", "site-a", [0.8] * 5),
        _evaluation("site-a", "site-b", [0.5] * 5),
        _evaluation("site-b", GLOBAL, [0.7] * 6), _evaluation("site-b", "site-a", [0.6] * 6),
        _evaluation("site-b", "site-b", [0.75] * 6),
        _evaluation("site-c", GLOBAL, [0.9] * 2), _evaluation("site-c", "site-a", [0.9] * 2),
        _evaluation("site-c", "site-b", [0.9] * 2),
    ]
    matrix = cells(evaluations)
    layout = cross_val_results(matrix)
    assert set(layout) == {"site-a", "site-b", "site-c"} and set(layout["site-a"]) == {GLOBAL, "site-a", "site-b"}
    assert layout["site-a"]["site-b"]["dice_liver"] == pytest.approx(0.5)
    assert layout["site-c"][GLOBAL]["dice_liver"] is None  # 2 cases: suppressed
    json.dumps(layout)  # the layout is plain JSON
    assert pa.Table.from_pylist(matrix_rows("liver-fed", matrix), schema=CROSS_SITE_EVALUATIONS.schema).num_rows \
        == len(evaluations) * len(Metric)

    result = answer(matrix, ["site-a", "site-b", "site-c"], "liver")
    assert result.worse == ["site-b"]  # global 0.70 < site-b's own 0.75 on site-b's data
    lines = result.text().splitlines()
    assert lines[0].startswith("site-a: global 0.900 vs own 0.800") and "at least as good" in lines[0]
    assert "GLOBAL WORSE" in lines[1]
    assert lines[2] == "site-c: no comparison (no local model of its own (the site did not consent, or its " \
                       "baseline failed))"
    assert heat_map_png(matrix, "liver").startswith(PNG)


def test_an_evaluation_request_names_valid_models() -> None:
    request = EvaluationRequest(1_700_000_000_000, "liver-test", 3, (GLOBAL, "site-a"))
    assert request.message_round(GLOBAL) != request.message_round("site-a")
    with pytest.raises(ValueError, match="threshold"):
        EvaluationRequest(1, "liver-test", 3, threshold=0)
    with pytest.raises(ValueError):
        EvaluationRequest(1, "../etc", 3)
