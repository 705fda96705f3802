"""notebooks/explore_cohort.ipynb runs headless (nbclient, a real IPython kernel) on the
evaluated demo, and says what the lake says."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from kaapana_assets.lake.schemas import EVALUATIONS
from tests.helpers import REPO

NOTEBOOK = REPO / "notebooks" / "explore_cohort.ipynb"


@pytest.mark.slow  # the session's demo and evaluation
@pytest.mark.timeout(1500)
def test_explore_cohort_notebook(evaluated_demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import nbformat
    from nbclient import NotebookClient

    from kaapana_assets.lake import Lake
    from kaapana_assets.nnunet.registry import find_version

    # The kernel inherits this environment: the evaluated demo's home and its test cohort.
    monkeypatch.setenv("KAAPANA_HOME", str(evaluated_demo.home.root))
    monkeypatch.setenv("KAAPANA_COHORTS", str(evaluated_demo.cohorts))
    monkeypatch.setenv("KAAPANA_NOTEBOOK_COHORT", "liver-test")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "committed without outputs"
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    nbformat.write(notebook, tmp_path / "explore_cohort.executed.ipynb")

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(figures) == 2  # the evaluation's box plots, the slice with both contours

    lake = Lake(evaluated_demo.home.lake)
    version = find_version(evaluated_demo.resources["mlflow"].tracking(), "nnunet-liver-train").version
    rows = lake.read(EVALUATIONS, (pl.col("cohort") == "liver-test") & (pl.col("model_version") == str(version)))
    liver = rows.filter(pl.col("label") == "liver")
    assert "cohort liver-test v1: 6 series, labels {'liver': 1, 'lesion': 2}" in text
    assert f"evaluation {rows['evaluation_id'][0]}: nnunet-liver-train v{version} on liver-test v1" in text
    assert f"liver: 6 cases, mean Dice {liver['dice'].mean():.3f}, median HD95 {liver['hd95_mm'].median():.1f} mm" in text
    # The slice shows the case the model did worst on, with its predicted SEG; its lineage follows.
    worst = liver.sort("dice").row(0, named=True)
    assert f"case {worst['series_uid']}: (16, 40, 40) voxels" in text
    assert f"SEG {worst['predicted_seg_sop_instance_uid']} (series {worst['predicted_seg_series_uid']}" in text
    assert f"model nnunet-liver-train v{version}" in text and "federated experiment liver-fed" in text
    assert "evaluated on cohort liver-test v1" in text
    assert "exported 6 cases (12 NIfTI files) of liver-test v1; Delta versions {'series': " in text
