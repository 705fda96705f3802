"""kaapana_assets.files.write_atomically: complete files only, under their final name."""

from __future__ import annotations

import array
import os
import stat
from pathlib import Path

import pytest

from kaapana_assets import files
from kaapana_assets.files import write_atomically


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


@pytest.mark.parametrize("durable", [True, False])
def test_writes_replaces_and_creates_missing_folders(tmp_path: Path, durable: bool) -> None:
    target = tmp_path / "a" / "b" / "x.dcm"
    assert write_atomically(target, b"first", durable=durable) == target
    assert target.read_bytes() == b"first"
    write_atomically(target, memoryview(b"second, longer"), durable=durable)
    assert target.read_bytes() == b"second, longer"
    assert leftovers(target.parent) == []
    # As tempfile.mkstemp created them: readable and writable by the owner only.
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_writes_any_buffer_byte_for_byte(tmp_path: Path) -> None:
    samples = array.array("h", [-2, 0, 1, 32767])  # a memoryview of 2-byte items
    write_atomically(tmp_path / "s.raw", memoryview(samples))
    assert (tmp_path / "s.raw").read_bytes() == samples.tobytes()
    big = os.urandom(3 * 2**20 + 7)
    write_atomically(tmp_path / "big", big)
    assert (tmp_path / "big").read_bytes() == big


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.dcm"
    write_atomically(target, b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_a_taken_temporary_name_is_never_written_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Names already there (a file, or a link pointing elsewhere) are skipped, never opened."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"untouched")
    tokens = iter([b"\x00" * 6, b"\x01" * 6, b"\x02" * 6])
    monkeypatch.setattr(files.os, "urandom", lambda n: next(tokens))
    (tmp_path / f".x.dcm.{'00' * 6}.part").symlink_to(elsewhere)
    (tmp_path / f".x.dcm.{'01' * 6}.part").write_bytes(b"someone else's")
    write_atomically(tmp_path / "x.dcm", b"ours")
    assert (tmp_path / "x.dcm").read_bytes() == b"ours"
    assert elsewhere.read_bytes() == b"untouched"
    assert (tmp_path / f".x.dcm.{'01' * 6}.part").read_bytes() == b"someone else's"


def test_gives_up_when_every_name_is_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files.os, "urandom", lambda n: b"\x07" * n)
    (tmp_path / f".x.dcm.{'07' * 6}.part").write_bytes(b"")
    with pytest.raises(FileExistsError, match="no unused temporary name"):
        write_atomically(tmp_path / "x.dcm", b"ours")
    assert not (tmp_path / "x.dcm").exists()


def test_a_folder_that_cannot_exist_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):  # a file where a folder must be
        write_atomically(tmp_path / "file" / "x.dcm", b"data")


def test_the_flushes_reach_what_they_name(tmp_path: Path) -> None:
    """Each flush opens what it names (a missing one raises) and flushes it without error."""
    target = write_atomically(tmp_path / "a" / "x.dcm", b"data", durable=False)
    fd = os.open(target, os.O_RDONLY)
    try:
        files.flush(fd)
        files.flush(fd, data_only=True)
    finally:
        os.close(fd)
    files.sync_dir(target.parent)
    files.sync_filesystem(tmp_path)
    with pytest.raises(FileNotFoundError):
        files.sync_filesystem(tmp_path / "missing")
