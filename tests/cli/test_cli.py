"""`kaapana ingest` as a user runs it (the demo: tests/flows/test_demo.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kaapana_assets.cli import main
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES
from tests.helpers import dicom_files


def test_ingest_command_copies_by_default(tmp_path: Path, spool_copy: Path, capsys: pytest.CaptureFixture) -> None:
    (spool_copy / "broken.dcm").write_bytes(b"\x00" * 10)
    files = dicom_files(spool_copy)
    assert main(["ingest", str(spool_copy), "--home", str(tmp_path / "home"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "quarantined not_dicom: 1" in " ".join(out.split())
    assert dicom_files(spool_copy) == files  # a user's folder is left alone without --move
    assert Lake(tmp_path / "home" / "lake").read(INSTANCES).height == len(files) - 1


def test_ingest_command_missing_folder(tmp_path: Path) -> None:
    assert main(["ingest", str(tmp_path / "nope"), "--home", str(tmp_path / "home")]) == 2
