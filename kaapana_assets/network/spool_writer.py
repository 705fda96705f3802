"""Durable, atomic writes into the spool: a file appears under its final name only
when it is complete and on stable storage (fsync, rename, fsync of the folder)."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info

from kaapana_assets.files import write_atomically
from kaapana_assets.ingest.uids import is_valid_uid

PREAMBLE = b"\x00" * 128 + b"DICM"


def safe_ae_title(ae_title: str) -> str:
    """An AE title as a folder name (AE titles are 16 characters of almost anything)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", ae_title.strip())[:16]
    return cleaned or "UNKNOWN"


def part10_bytes(file_meta: FileMetaDataset, encoded_dataset: bytes | memoryview) -> bytes:
    """A DICOM Part 10 file: preamble, file meta, and the data set bytes exactly as given."""
    buf = io.BytesIO()
    buf.write(PREAMBLE)
    write_file_meta_info(buf, file_meta, enforce_standard=True)  # type: ignore[arg-type]
    buf.write(encoded_dataset)
    return buf.getvalue()


def write_durably(folder: Path, name: str, data: bytes) -> Path:
    """Write `data` as folder/name, atomically and durably. Readers (the sensor skips
    dot-files and *.part) never see a partial file. A different file already under that
    name is kept: the new one gets a name with its content digest."""
    target = folder / name
    if target.exists() and target.read_bytes() != data:
        target = folder / f"{Path(name).stem}.{hashlib.sha256(data).hexdigest()[:12]}.dcm"
    return write_atomically(target, data)


def spool_name(sop_instance_uid: object, data: bytes) -> str:
    """File name from the SOP Instance UID when it is a valid UID (else the content digest:
    a hostile UID never becomes a path; the ingest will quarantine the file)."""
    if is_valid_uid(sop_instance_uid):
        return f"{sop_instance_uid}.dcm"
    return f"{hashlib.sha256(data).hexdigest()}.dcm"
