"""Crash safety: SIGKILL the ingest mid-way, run it again; the tables equal a clean run's."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from kaapana_assets.archive.service import Archive
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES, SERIES, STUDIES, TableSpec
from tests.helpers import dicom_files

VOLATILE = {"ingested_at", "updated_at", "source_path"}


def _table(lake: Lake, table: TableSpec, key: str) -> pl.DataFrame:
    frame = lake.read(table)
    return frame.drop([c for c in frame.columns if c in VOLATILE]).sort(key)


def _commits(lake_root: Path) -> int:
    log = lake_root / "instances" / "_delta_log"
    return len(list(log.glob("*.json"))) if log.exists() else 0


def _ingest_cmd(spool: Path, home: Path) -> list[str]:
    return [sys.executable, "-m", "kaapana_assets.cli", "ingest", str(spool), "--home", str(home),
            "--move", "--batch-size", "6", "--workers", "1"]


def test_kill_mid_ingest_then_rerun_equals_clean_run(tmp_path: Path, corpus_root: Path) -> None:
    clean_home = KaapanaHome(tmp_path / "clean")
    clean_spool = tmp_path / "clean-spool"
    shutil.copytree(corpus_root, clean_spool)
    expected_files = len(dicom_files(clean_spool))
    ingest_files(dicom_files(clean_spool), Archive.for_home(clean_home))

    home = tmp_path / "crashed"
    spool = tmp_path / "spool"
    shutil.copytree(corpus_root, spool)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kills = 0
    for wanted_commits in (2, 5):  # kill twice, at different points
        proc = subprocess.Popen(_ingest_cmd(spool, home), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if _commits(home / "lake") >= wanted_commits:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    assert kills >= 1, "ingest finished before it could be killed"
    assert dicom_files(spool), "the kill left nothing to resume"

    final = subprocess.run(_ingest_cmd(spool, home), env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    assert not dicom_files(spool)  # everything committed and removed from the spool

    crashed, clean = Lake(home / "lake"), Lake(clean_home.lake)
    for table, key in ((INSTANCES, "sop_instance_uid"), (SERIES, "series_uid"), (STUDIES, "study_uid")):
        got, want = _table(crashed, table, key), _table(clean, table, key)
        assert got.height == want.height, table.name
        assert got[key].n_unique() == got.height, f"duplicate keys in {table.name}"
        assert got.equals(want), table.name
    assert _table(crashed, INSTANCES, "sop_instance_uid").height == expected_files
    archived = [p for p in (home / "archive").rglob("*.dcm")]
    assert len(archived) == expected_files
