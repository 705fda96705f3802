"""`kaapana ingest` and `kaapana demo` as a user runs them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kaapana_assets.cli import main
from kaapana_assets.lake import Lake
from tests.conftest import dicom_files


def test_ingest_command_copies_by_default(tmp_path: Path, spool_copy: Path, capsys: pytest.CaptureFixture) -> None:
    (spool_copy / "broken.dcm").write_bytes(b"\x00" * 10)
    files = dicom_files(spool_copy)
    assert main(["ingest", str(spool_copy), "--home", str(tmp_path / "home"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "quarantined not_dicom: 1" in " ".join(out.split())
    assert dicom_files(spool_copy) == files  # a user's folder is left alone without --move
    assert Lake(tmp_path / "home" / "lake").read("instances").height == len(files) - 1


def test_ingest_command_missing_folder(tmp_path: Path) -> None:
    assert main(["ingest", str(tmp_path / "nope"), "--home", str(tmp_path / "home")]) == 2


def test_demo_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("KAAPANA_HOME", str(tmp_path / "kaapana"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    assert main(["demo", "--studies", "1", "--sites", "site-b", "site-c"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "What the lake holds, per site" in out and "truncated: 2" in out
    lake = Lake(tmp_path / "kaapana" / "lake")
    assert lake.read("studies").height == 2
    assert lake.read("quarantine").height == 2
    assert (tmp_path / "dagster" / "dagster.yaml").exists()
    assert os.listdir(tmp_path / "dagster" / "storage")  # runs recorded on the persistent instance
