"""incoming_studies: quiet period, one request per study, no duplicates, unreadable files routed,
ingest and segmentation in one run while a production model exists."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.sensor_definition import SensorExecutionData  # noqa: F401  (evaluate_tick result type)
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from kaapana_assets.ingest.arrivals import BURST_JOIN_S
from kaapana_assets.ingest.spool import UNREADABLE, plan_spool, scan_spool, study_of_file, wait_until_quiet
from kaapana_assets.lake.schemas import INSTANCES, QUARANTINE, STUDIES
from resources.mlflow import MlflowResource
from resources.nnunet import NnunetResource
from resources.storage import ArchiveResource, LakeResource
from sensors import incoming
from sensors.incoming import BURST_TAG, EARLY_TAG, incoming_studies, production_version


def _age(root: Path, seconds: float) -> None:
    past = time.time() - seconds
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, (past, past))


QUIET_S = 1.0


def _tick(instance: dg.DagsterInstance, home: Path, cursor: str | None = None,
          early_start: bool = False) -> "SensorExecutionData":
    """One evaluation. early_start off by default: most tests here are about the quiet-period
    path, which early starts leave to late files and to what a finished early run left."""
    import definitions

    with dg.partition_loading_context(dynamic_partitions_store=instance):
        context = dg.build_sensor_context(
            instance=instance,
            instance_ref=instance.get_ref(),
            cursor=cursor,
            definitions=definitions.defs,
            resources={"archive": ArchiveResource(home=str(home), quiet_period_s=QUIET_S, early_start=early_start),
                       "mlflow": _mlflow(home),
                       "nnunet_settings": NnunetResource(workdir=str(home / "nnunet"))},
        )
        return incoming_studies.evaluate_tick(context)  # type: ignore[return-value]


def _mlflow(home: Path) -> MlflowResource:
    return MlflowResource(tracking_uri=f"sqlite:///{home / 'mlflow.db'}", artifact_root=(home / "mlartifacts").as_uri())


def test_plan_spool_groups_and_waits(tmp_path: Path, corpus_root: Path, corpus: dict) -> None:
    spool = tmp_path / "incoming"
    shutil.copytree(corpus_root, spool)
    (spool / "garbage.dcm").write_bytes(b"garbage")
    _age(spool, 3600)  # copied with old mtimes, as `cp -p` does: first sight still counts
    files = scan_spool(spool)
    now = time.time_ns()
    plan = plan_spool(files, {}, now, quiet_period_s=10)
    assert plan.ready == {} and len(plan.waiting) == 7  # 6 studies + unreadable, all new
    later = plan_spool(files, plan.studies_of, now + 11 * 10**9, quiet_period_s=10)
    studies = {s.study_uid for site in corpus.values() for s in site}
    assert set(later.ready) == studies and later.unreadable == [str(spool / "garbage.dcm")]
    assert plan.studies_of[str(spool / "garbage.dcm")][2] == UNREADABLE


def test_a_file_written_since_the_last_scan_counts_from_its_mtime(tmp_path: Path, corpus_root: Path) -> None:
    spool = tmp_path / "incoming"
    shutil.copytree(corpus_root, spool)
    written = time.time_ns() - 2 * 10**9
    for f in spool.rglob("*"):
        os.utime(f, ns=(written, written))
    files = scan_spool(spool)
    # Written after the previous scan: settled one quiet period after the last write, not
    # one quiet period after this scan first saw it.
    plan = plan_spool(files, {}, written + 4 * 10**9, quiet_period_s=10, previous_scan_ns=written - 10**9)
    assert plan.ready == {} and max(plan.settles_in_s.values()) == pytest.approx(6.0, abs=0.01)
    ready = plan_spool(files, plan.studies_of, written + 10 * 10**9 + 1, quiet_period_s=10,
                       previous_scan_ns=written + 4 * 10**9)
    assert len(ready.ready) == 6 and not ready.waiting
    # Old mtimes (`cp -p`), or no previous scan: the file may have appeared just now.
    _age(spool, 3600)
    old = scan_spool(spool)
    now = time.time_ns()
    for previous in (now - 5 * 10**9, None):
        plan = plan_spool(old, {}, now, quiet_period_s=10, previous_scan_ns=previous)
        assert plan.ready == {} and min(plan.settles_in_s.values()) == pytest.approx(10.0, abs=0.01)


def test_sensor_quiet_period_one_request_per_study_no_duplicates(tmp_path: Path, corpus_root: Path, corpus: dict) -> None:
    home = tmp_path / "home"
    spool = home / "incoming"
    shutil.copytree(corpus_root, spool)
    studies = {s.study_uid for site in corpus.values() for s in site}
    with dg.instance_for_test() as instance:
        # Files still arriving: nothing requested.
        first = _tick(instance, home)
        assert not first.run_requests and "waiting" in (first.skip_message or "")
        # Quiet period over: the studies settled together, so they are one burst: one run over
        # their partition range (added in that order), keyed by content.
        time.sleep(QUIET_S + 0.1)
        second = _tick(instance, home, first.cursor)
        [request] = second.run_requests
        added = [k for req in second.dynamic_partitions_requests for k in req.partition_keys]  # type: ignore[union-attr]
        assert added == sorted(studies)
        assert request.partition_key is None and request.run_key.startswith("burst:")  # type: ignore[union-attr]
        assert (request.tags[ASSET_PARTITION_RANGE_START_TAG], request.tags[ASSET_PARTITION_RANGE_END_TAG]) == (
            added[0], added[-1])
        files = request.run_config["ops"]["dicom_studies"]["config"]["files"]
        assert files and all(Path(f).exists() for f in files)
        assert {study_of_file(f) for f in files} == studies
        # The next tick gives no duplicate.
        for key in added:
            instance.add_dynamic_partitions("studies", [key])
        third = _tick(instance, home, second.cursor)
        assert not third.run_requests
        # A new file for one study changes its digest: exactly that study is requested again.
        study = next(iter(corpus.values()))[0]
        extra = Path(files[0]).with_name("copy-of-first.dcm")
        shutil.copy(study.ct_files[0], extra)
        settling = _tick(instance, home, third.cursor)
        assert not settling.run_requests  # the new file settles first
        time.sleep(QUIET_S + 0.1)
        fourth = _tick(instance, home, settling.cursor)
        assert [r.partition_key for r in fourth.run_requests] == [study.study_uid]


def test_sensor_routes_unreadable_files_to_quarantine(tmp_path: Path) -> None:
    home = tmp_path / "home"
    spool = home / "incoming"
    spool.mkdir(parents=True)
    (spool / "broken.dcm").write_bytes(b"\x00" * 200)
    (spool / ".in-flight.dcm.part").write_bytes(b"partial")  # receiver temp files are ignored
    with dg.instance_for_test() as instance:
        first = _tick(instance, home)
        time.sleep(QUIET_S + 0.1)
        result = _tick(instance, home, first.cursor)
        assert len(result.run_requests) == 1
        request = result.run_requests[0]
        assert request.job_name == "quarantine_unreadable"
        assert request.run_config["ops"]["quarantine"]["config"]["files"] == [str(spool / "broken.dcm")]
        assert not _tick(instance, home, result.cursor).run_requests
        assert json.loads(result.cursor)["requested"]  # type: ignore[arg-type]


def test_sensor_handles_odd_names_and_links(tmp_path: Path, corpus: dict) -> None:
    """A file name that is not UTF-8 and a symbolic link to a DICOM file outside the home:
    the sensor plans both without reading through the link, the runs ingest the first and
    record the link as not_regular_file, and the link's target is never touched."""
    import polars as pl

    from kaapana_assets.lake import Lake

    home = tmp_path / "home"
    spool = home / "incoming"
    spool.mkdir(parents=True)
    study = corpus["site-a"][0]
    odd = spool / os.fsdecode(b"IM-\xff\xfe.dcm")
    shutil.copy(study.ct_files[0], odd)
    outside = tmp_path / "outside.dcm"
    shutil.copy(study.ct_files[1], outside)
    (spool / "link.dcm").symlink_to(outside)
    import definitions

    with dg.instance_for_test() as instance:
        first = _tick(instance, home)
        time.sleep(QUIET_S + 0.1)
        result = _tick(instance, home, first.cursor)
        jobs = {r.job_name: r for r in result.run_requests}
        assert set(jobs) == {"ingest_study", "quarantine_unreadable"}
        assert jobs["quarantine_unreadable"].run_config["ops"]["quarantine"]["config"]["files"] == [
            str(spool / "link.dcm")]
        for req in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys or []))
        for request in result.run_requests:
            job = definitions.defs.resolve_job_def(request.job_name)
            run = job.execute_in_process(run_config=request.run_config, instance=instance,
                                         partition_key=request.partition_key,
                                         resources={"archive": ArchiveResource(home=str(home), quiet_period_s=QUIET_S),
                                                    "lake": LakeResource(uri=str(home / "lake"))})
            assert run.success
    lake = Lake(home / "lake")
    assert lake.read(INSTANCES)["sop_instance_uid"].to_list() == [pydicom_uid(study.ct_files[0])]
    q = lake.read(QUARANTINE).filter(pl.col("reason") == "not_regular_file")
    assert q.height == 1
    assert outside.read_bytes() == study.ct_files[1].read_bytes()
    assert list(spool.iterdir()) == []


def pydicom_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_sensor_requests_ingest_and_segmentation_in_one_run_with_a_production_model(
        tmp_path: Path, corpus: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a production model the sensor's run ingests and segments (one process, one model
    load); without one it only ingests, and asking for the model creates no MLflow store."""
    import definitions

    home = tmp_path / "home"
    spool = home / "incoming"
    study = corpus["site-a"][0]
    spool.mkdir(parents=True)
    for f in study.ct_files:
        shutil.copy(f, spool / f.name)
    assert production_version(_mlflow(home), NnunetResource(workdir=str(home / "nnunet"))) is None
    assert not (home / "mlflow.db").exists()
    with dg.instance_for_test() as instance:
        first = _tick(instance, home)
        time.sleep(QUIET_S + 0.1)
        monkeypatch.setattr(incoming, "production_version", lambda mlflow, nnunet_settings: "3")
        ready = _tick(instance, home, first.cursor)
    assert [(r.job_name, r.partition_key) for r in ready.run_requests] == [("ingest_and_segment", study.study_uid)]
    job = definitions.defs.resolve_job_def("ingest_and_segment")
    assert {node.name for node in job.graph.node_defs} >= {"dicom_studies", "segmentations"}
    assert job.executor_def.name == "in_process"  # one process per run: imports and model load once
    # The run config the sensor writes fits the combined job too, with the production version
    # it saw pinned for the segmentation step.
    assert ready.run_requests[0].run_config["ops"]["dicom_studies"]["config"]["files"]
    assert ready.run_requests[0].run_config["ops"]["segmentations"]["config"] == {"model_version": "3"}
    dg.validate_run_config(job, ready.run_requests[0].run_config)


def _run_request(instance: dg.DagsterInstance, home: Path, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    import definitions

    job = definitions.defs.resolve_job_def(request.job_name)  # type: ignore[arg-type]
    return job.execute_in_process(run_config=request.run_config, instance=instance, partition_key=request.partition_key,
                                  tags=request.tags, raise_on_error=False,
                                  resources={"archive": ArchiveResource(home=str(home), quiet_period_s=QUIET_S),
                                             "lake": LakeResource(uri=str(home / "lake"))})


def test_a_burst_is_one_run_and_a_failed_burst_is_split(tmp_path: Path, corpus_root: Path, corpus: dict) -> None:
    """Studies that settle together are ingested by one run over their partition range, each
    partition materialized; a burst whose run failed for good becomes one run per study."""
    from kaapana_assets.lake import Lake

    home = tmp_path / "home"
    spool = home / "incoming"
    shutil.copytree(corpus_root, spool)
    studies = sorted({s.study_uid for site in corpus.values() for s in site})
    with dg.instance_for_test() as instance:
        first = _tick(instance, home)
        time.sleep(QUIET_S + 0.1)
        second = _tick(instance, home, first.cursor)
        [burst] = second.run_requests
        for req in second.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys or []))
        # The daemon launched the burst and it failed for good (no retries on this instance).
        failed = _run_request(instance, home, dg.RunRequest(job_name=burst.job_name, run_config={
            "ops": {"dicom_studies": {"config": {"files": [str(tmp_path / "missing.dcm")]}}}}, tags=burst.tags))
        assert not failed.success
        split = _tick(instance, home, second.cursor)
        assert sorted(r.partition_key for r in split.run_requests) == studies  # type: ignore[type-var]
        assert all(":after-burst:" in (r.run_key or "") for r in split.run_requests)
        assert not _tick(instance, home, split.cursor).run_requests  # split once
        # The burst's own run, as the sensor asked for it: every study in one run.
        result = _run_request(instance, home, burst)
        assert result.success
        materialized = instance.get_materialized_partitions(dg.AssetKey("dicom_studies"))
        assert materialized == set(studies)
        assert set(Lake(home / "lake").read(STUDIES)["study_uid"].to_list()) == set(studies)
        metadata = result.asset_materializations_for_node("dicom_studies")[0].metadata
        assert metadata["study_count"].value == len(studies)
        assert BURST_TAG in burst.tags


def test_a_ready_study_waits_briefly_for_one_about_to_settle(tmp_path: Path, corpus: dict) -> None:
    """Two studies copied a moment apart become one burst run, not two runs."""
    home = tmp_path / "home"
    spool = home / "incoming"
    a, b = corpus["site-a"][0], corpus["site-a"][1]
    (spool / "a").mkdir(parents=True)
    for f in a.ct_files:
        shutil.copy(f, spool / "a" / f.name)
    with dg.instance_for_test() as instance:
        cursor = _tick(instance, home).cursor
        time.sleep(QUIET_S * 0.6)
        (spool / "b").mkdir()
        for f in b.ct_files:
            shutil.copy(f, spool / "b" / f.name)
        requests: list[dg.RunRequest] = []
        for _ in range(6):
            time.sleep(QUIET_S * 0.5)
            result = _tick(instance, home, cursor)
            cursor = result.cursor
            requests += result.run_requests
            for req in result.dynamic_partitions_requests or []:
                instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys or []))
    [request] = requests
    assert request.tags[BURST_TAG] and {study_of_file(f) for f in
                                         request.run_config["ops"]["dicom_studies"]["config"]["files"]} == {
        a.study_uid, b.study_uid}


def test_studies_settling_a_moment_apart_are_one_burst_in_the_same_tick(tmp_path: Path, corpus: dict) -> None:
    """Copied after the sensor's last scan, a study settles one quiet period after its last
    write; one settling within BURST_JOIN_S of a ready one joins it in the same tick."""
    home = tmp_path / "home"
    spool = home / "incoming"
    spool.mkdir(parents=True)
    a, b = corpus["site-a"][0], corpus["site-a"][1]
    with dg.instance_for_test() as instance:
        cursor = _tick(instance, home).cursor  # an empty spool: the previous scan
        scanned = json.loads(cursor or "{}")["scanned_ns"]
        for name, study, offset_s in (("a", a, 0.1), ("b", b, 0.1 + BURST_JOIN_S / 2)):
            (spool / name).mkdir()
            for f in study.ct_files:
                shutil.copy(f, spool / name / f.name)
                written = scanned + int(offset_s * 1e9)
                os.utime(spool / name / f.name, ns=(written, written))
        time.sleep(max(0.0, (scanned + int((QUIET_S + 0.2) * 1e9) - time.time_ns()) / 1e9))
        result = _tick(instance, home, cursor)
    [request] = result.run_requests  # a settled 0.1 s ago, b settles within BURST_JOIN_S: together
    assert request.tags[BURST_TAG] and {study_of_file(f) for f in
                                         request.run_config["ops"]["dicom_studies"]["config"]["files"]} == {
        a.study_uid, b.study_uid}


def _add_partitions(instance: dg.DagsterInstance, result: "SensorExecutionData") -> None:
    for req in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys or []))


def test_a_new_study_gets_its_run_as_it_arrives(tmp_path: Path, corpus: dict) -> None:
    """early_start: the first sight of a new study requests its run, with no file list; the
    run waits for the quiet period itself and ingests. While it runs the study gets no other
    run; files that come after it ingested go the quiet-period way, as late instances."""
    from kaapana_assets.lake import Lake

    home = tmp_path / "home"
    spool = home / "incoming"
    spool.mkdir(parents=True)
    study, other = corpus["site-a"][0], corpus["site-b"][0]
    with dg.instance_for_test() as instance:
        empty = _tick(instance, home, early_start=True)  # the scan before the study arrives
        scanned = json.loads(empty.cursor or "{}")["scanned_ns"]
        for s in (study, other):
            (spool / s.study_uid[-8:]).mkdir()
            for f in s.ct_files:
                shutil.copy(f, spool / s.study_uid[-8:] / f.name)
        first = _tick(instance, home, empty.cursor, early_start=True)
        [request] = first.run_requests  # both first seen in this tick: one run over their range
        assert request.run_key.startswith("early:") and request.tags[EARLY_TAG]  # type: ignore[union-attr]
        assert request.job_name == "ingest_study"  # no production model
        config = request.run_config["ops"]["dicom_studies"]["config"]
        assert config == {"files": [], "await_quiet_s": QUIET_S, "arrived_after_ns": scanned, "warm_imports": []}
        added = [k for req in first.dynamic_partitions_requests for k in req.partition_keys]  # type: ignore[union-attr]
        assert added == sorted([study.study_uid, other.study_uid])
        assert (request.tags[ASSET_PARTITION_RANGE_START_TAG], request.tags[ASSET_PARTITION_RANGE_END_TAG]) == (
            added[0], added[-1])
        _add_partitions(instance, first)
        # Settled, but its run is under way: nothing more.
        time.sleep(QUIET_S + 0.1)
        during = _tick(instance, home, first.cursor, early_start=True)
        assert not during.run_requests and "started as they arrived" in (during.skip_message or "")
        # The run, as the daemon launches it: it waits (quiet already), ingests both, empties the spool.
        result = _run_request(instance, home, request)
        assert result.success
        assert instance.get_materialized_partitions(dg.AssetKey("dicom_studies")) == set(added)
        assert set(Lake(home / "lake").read(STUDIES)["study_uid"].to_list()) == set(added)
        assert not [p for p in spool.rglob("*") if p.is_file()]
        after = _tick(instance, home, during.cursor, early_start=True)
        assert not after.run_requests and json.loads(after.cursor or "{}")["early"] == {}
        # A late instance of a known study: the quiet-period path, with its file list.
        late = spool / "late.dcm"
        shutil.copy(study.ct_files[0], late)
        settling = _tick(instance, home, after.cursor, early_start=True)
        assert not settling.run_requests and not settling.dynamic_partitions_requests
        time.sleep(QUIET_S + 0.1)
        [again] = _tick(instance, home, settling.cursor, early_start=True).run_requests
        assert again.partition_key == study.study_uid and not again.run_key.startswith("early:")  # type: ignore[union-attr]
        assert again.run_config["ops"]["dicom_studies"]["config"]["files"] == [str(late)]


def test_an_early_run_segments_with_the_predictor_imported_while_it_waits(
        tmp_path: Path, corpus: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a production model the early run is ingest_and_segment, pins the version and
    imports the predictor's modules while it waits; its config fits the job."""
    import definitions
    from kaapana_assets.segmentation.models import PREDICTION_IMPORTS

    home = tmp_path / "home"
    (home / "incoming").mkdir(parents=True)
    study = corpus["site-a"][0]
    for f in study.ct_files:
        shutil.copy(f, home / "incoming" / f.name)
    monkeypatch.setattr(incoming, "production_version", lambda mlflow, nnunet_settings: "3")
    with dg.instance_for_test() as instance:
        [request] = _tick(instance, home, early_start=True).run_requests
    assert (request.job_name, request.partition_key) == ("ingest_and_segment", study.study_uid)
    ops = request.run_config["ops"]
    assert ops["dicom_studies"]["config"]["warm_imports"] == list(PREDICTION_IMPORTS)
    assert ops["dicom_studies"]["config"]["arrived_after_ns"] == 0  # no scan before: counts from first sight
    assert ops["segmentations"]["config"] == {"model_version": "3"}
    dg.validate_run_config(definitions.defs.resolve_job_def("ingest_and_segment"), request.run_config)


def test_an_early_run_leaves_a_study_still_arriving_to_the_sensor(tmp_path: Path, corpus: dict) -> None:
    """A study still arriving after max_wait_s: the run succeeds without materializing and
    leaves every file in the spool (the sensor's quiet-period run takes them)."""
    home = tmp_path / "home"
    spool = home / "incoming"
    spool.mkdir(parents=True)
    study = corpus["site-a"][0]
    for f in study.ct_files:
        shutil.copy(f, spool / f.name)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("studies", [study.study_uid])
        result = _run_request(instance, home, dg.RunRequest(
            job_name="ingest_study", partition_key=study.study_uid,
            run_config={"ops": {"dicom_studies": {"config": {"await_quiet_s": 60.0, "max_wait_s": 0.3}}}}))
        assert result.success
        assert not result.asset_materializations_for_node("dicom_studies")
        assert instance.get_materialized_partitions(dg.AssetKey("dicom_studies")) == set()
    assert sorted(p.name for p in spool.iterdir()) == sorted(f.name for f in study.ct_files)


def test_wait_until_quiet_follows_new_writes(tmp_path: Path, corpus: dict) -> None:
    """The run's wait ends one quiet period after the study's last write — a file written
    during the wait postpones it — and only the awaited studies count."""
    import threading

    spool = tmp_path / "incoming"
    spool.mkdir()
    a, b = corpus["site-a"][0], corpus["site-b"][0]
    before = time.time_ns()
    for f in a.ct_files[:-1]:
        shutil.copy(f, spool / f.name)
    late = threading.Timer(0.3, lambda: shutil.copy(a.ct_files[-1], spool / a.ct_files[-1].name))
    late.start()
    # b keeps changing throughout: not awaited, so it holds nothing up.
    stop = threading.Event()

    def keep_writing() -> None:
        while not stop.wait(0.1):
            shutil.copy(b.ct_files[0], spool / "b.dcm")

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        start = time.monotonic()
        # A quiet period well beyond the late write: a loaded machine may run the timer late.
        files = wait_until_quiet(spool, [a.study_uid], quiet_period_s=2.0, max_wait_s=30, arrived_after_ns=before)
        waited = time.monotonic() - start
    finally:
        stop.set()
        writer.join()
        late.join()
    assert files is not None and sorted(Path(f).name for f in files[a.study_uid]) == sorted(
        f.name for f in a.ct_files)
    assert waited >= 0.3 + 2.0 - 0.1  # the last write, then the quiet period
    # Never quiet within max_wait_s: None.
    shutil.copy(b.ct_files[0], spool / "b.dcm")
    assert wait_until_quiet(spool, [b.study_uid], quiet_period_s=5, max_wait_s=0.2) is None


def test_an_early_run_finds_its_study_in_every_encoding_among_foreign_and_broken_files(
        tmp_path: Path, encoded_corpus) -> None:  # type: ignore[no-untyped-def]
    """The early run's wait groups the spool by study with the ingest's own header check: a
    study sent in every transfer syntax (implicit VR, big endian, deflate, JPEG family, RLE,
    JPEG 2000, HTJ2K) is found — except files no installed codec reads (12-bit JPEG
    Extended) — and pydicom's shipped files (another writer) form their own studies. Those
    undecodable files and mutated ones (header cut, pixel data cut, garbage) never join a
    run's study: they are the sensor's unreadable group, quarantined with their reason."""
    import pydicom

    from kaapana_assets.ingest.headers import Rejected, parse_header
    from tests.helpers import PYDICOM_DATA

    spool = tmp_path / "incoming"
    sent: dict[str, list[str]] = {}
    for name, files in encoded_corpus.series.items():
        (spool / name).mkdir(parents=True)
        sent[name] = [str(shutil.copy(f, spool / name / f.name)) for f in files]
    pydicom_data = PYDICOM_DATA / "test_files"
    foreign = {name: str(pydicom.dcmread(pydicom_data / name, stop_before_pixels=True).StudyInstanceUID)
               for name in ("CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm")}
    for name in foreign:
        shutil.copy(pydicom_data / name, spool / name)
    sample = encoded_corpus.series["jpeg2000_lossless"][0].read_bytes()
    mutated = {"pixels-cut.dcm": sample[: len(sample) - 200], "header-cut.dcm": sample[:200],
               "garbage.dcm": os.urandom(4096)}
    for name, data in mutated.items():
        (spool / name).write_bytes(data)

    def rejected(path: str) -> bool:
        try:
            parse_header(Path(path).read_bytes())
            return False
        except Rejected:
            return True

    undecodable = sorted(f for files in sent.values() for f in files if rejected(f))
    assert {Path(f).parent.name for f in undecodable} <= {"jpeg_extended"}  # the codec we lack, nothing else
    files = wait_until_quiet(spool, [encoded_corpus.study.study_uid, *foreign.values()], quiet_period_s=0.2,
                             max_wait_s=30)
    assert files is not None
    study = files[encoded_corpus.study.study_uid]
    assert sorted(study) == sorted(f for fs in sent.values() for f in fs if f not in undecodable)
    assert {Path(f).parent.name for f in study} >= {"implicit_le", "explicit_be", "deflated", "jpeg_lossless",
                                                    "jpeg_ls_lossless", "rle", "jpeg2000", "htj2k_lossless"}
    assert all(files[uid] == [str(spool / name)] for name, uid in foreign.items())
    plan = plan_spool(scan_spool(spool), {}, time.time_ns() + 10**9, 0.2, time.time_ns() - 60 * 10**9)
    assert sorted(plan.unreadable) == sorted([*undecodable, *(str(spool / name) for name in mutated)])
