"""The automatic path under the real daemon: a study copied into the spool of a running
`dagster dev` ends up as a SEG in the segmentations table with no manual step — one
ingest_and_segment run, started as the study arrives, and the automation does not segment it
a second time; studies that arrive together share one run over their partition range."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef

from kaapana_assets.nnunet.registry import find_version
from kaapana_assets.training.tracking import Tracking
from tests.helpers import REPO


def _bench() -> ModuleType:
    """bench/arrival.py: the daemon, the spool drop and the wait are the benchmark's own."""
    spec = importlib.util.spec_from_file_location("bench_arrival", REPO / "bench" / "arrival.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _wait_for_automation_ticks(dagster_home: Path, count: int, timeout_s: float) -> None:
    """Until every run has ended and the segmentation_automation sensor has finished `count`
    ticks that started after that (each could have asked for the studies again)."""
    from dagster._core.scheduler.instigation import InstigatorType, TickStatus

    deadline = time.monotonic() + timeout_s
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as instance:
        while not all(run.is_finished for run in instance.get_runs()):
            assert time.monotonic() < deadline, f"runs still in progress after {timeout_s:.0f} s"
            time.sleep(0.5)
        ended = time.time()
        [state] = [s for s in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
                   if s.name == "segmentation_automation"]
        while sum(tick.status != TickStatus.STARTED for tick in instance.get_ticks(
                state.instigator_origin_id, state.selector_id, after=ended)) < count:
            assert time.monotonic() < deadline, f"fewer than {count} automation ticks in {timeout_s:.0f} s"
            time.sleep(0.5)


@pytest.mark.slow
def test_a_study_dropped_into_the_spool_is_segmented_by_the_running_daemon(trained_site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arrival = _bench()
    home = tmp_path / "kaapana"
    # The trained site (studies, lake, archive, MLflow with a production model), a fresh instance.
    shutil.copytree(trained_site.home.root, home, ignore=shutil.ignore_patterns("incoming"))
    [(study_uid, folder), *burst] = arrival.new_studies(tmp_path / "new", 3, 900)
    burst_uids = [uid for uid, _ in burst]
    dagster_home = tmp_path / "dagster"
    log = tmp_path / "dagster-dev.log"
    with arrival.running_daemon(home, dagster_home, REPO, log):
        since, _ = arrival.drop([(study_uid, folder)], home / "incoming", "arrival")
        seen = arrival.wait_for_segs(home / "lake", [study_uid], since, timeout_s=600)
        assert study_uid in seen, f"no SEG within 600 s; see {log}:\n{log.read_text()[-3000:]}"
        since, _ = arrival.drop(burst, home / "incoming", "burst")
        seen = arrival.wait_for_segs(home / "lake", burst_uids, since, timeout_s=600)
        assert set(seen) == set(burst_uids), f"burst: SEGs for {sorted(seen)} only; see {log}"
        # Two automation ticks after the runs: neither may segment the studies again.
        _wait_for_automation_ticks(dagster_home, count=2, timeout_s=120)
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as instance:
        runs = [(r.job_name, r.tags.get("dagster/partition") or
                 (r.tags.get("dagster/asset_partition_range_start"), r.tags.get("dagster/asset_partition_range_end")),
                 r.status) for r in reversed(instance.get_runs())]
        segmented = {uid: len(instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("segmentations"), asset_partitions=[uid]), limit=10).records)
            for uid in [study_uid, *burst_uids]}
        # Each run segmented with the production version the sensor saw, pinned in its config.
        pinned = {r.run_config["ops"].get("segmentations", {}).get("config", {}).get("model_version")
                  for r in instance.get_runs()}
    tracking = Tracking(f"sqlite:///{home / 'mlflow.db'}", str(home / "mlartifacts"))
    production = find_version(tracking, "nnunet-liver-train")
    assert pinned == {str(production.version)}
    # The study's run, then the burst's: one run over its range, or — when the copy straddled
    # two sensor ticks — one run per tick's share (each started as its studies arrived).
    assert runs[0] == ("ingest_and_segment", study_uid, dg.DagsterRunStatus.SUCCESS)
    assert all(job == "ingest_and_segment" and status == dg.DagsterRunStatus.SUCCESS for job, _, status in runs[1:])
    covered = [p for _, partitions, _ in runs[1:] for p in ([partitions] if isinstance(partitions, str) else
                                                              sorted(set(partitions)))]
    assert sorted(covered) == sorted(burst_uids) and 2 <= len(runs) <= 3
    assert segmented == {uid: 1 for uid in [study_uid, *burst_uids]}
    assert list((home / "incoming").rglob("*.dcm")) == []  # the spool files were ingested and cleared
