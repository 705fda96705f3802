"""The worked extension: an external program run through Dagster Pipes reports metrics."""

from __future__ import annotations

import dagster as dg

from kaapana_assets.archive.service import Archive
from kaapana_assets.extensions.assets import study_metrics
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from resources import site_resources
from tests.helpers import SMALL


def test_study_metrics_through_pipes_subprocess(home: KaapanaHome, targets: Archive, corpus: dict) -> None:
    study = corpus["site-b"][0]
    ingest_files(study.files, targets, remove_sources=False)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("studies", [study.study_uid])
        result = dg.materialize([study_metrics], partition_key=study.study_uid, instance=instance,
                                resources=site_resources(home.root))
        metadata = {k: v.value for k, v in result.asset_materializations_for_node("study_metrics")[0].metadata.items()}
        assert metadata["ct_slices"] == SMALL["slices"] and metadata["files"] == SMALL["slices"] + 1  # + the SEG
        assert metadata["modalities"] == {"CT": SMALL["slices"], "SEG": 1}
        assert 0.0 < metadata["body_fraction"] < 1.0 and -200 < metadata["hu_mean_body"] < 200
        # The program's own log lines came back through Pipes.
        logs = instance.all_logs(result.run_id)
        assert any(f"{SMALL['slices'] + 1} file(s)" in (e.user_message or "") for e in logs)


def test_study_metrics_needs_an_ingested_study(home: KaapanaHome) -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("studies", ["1.2.3"])
        result = dg.materialize([study_metrics], partition_key="1.2.3", instance=instance,
                                resources=site_resources(home.root), raise_on_error=False)
        assert not result.success
        assert "materialize dicom_studies first" in result.get_step_failure_events()[0].step_failure_data.error.message
