"""Poison files: one bad file never blocks its batch, one header value never costs memory
or time in proportion to itself, and nothing from the spool is followed or linked out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from kaapana_assets.archive.service import Archive
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest import elements
from kaapana_assets.ingest.headers import Reason
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.lake.schemas import INSTANCES, QUARANTINE, SERIES
from tests.helpers import EncodedCorpus


def _variant(src: Path, out: Path, **changes: object) -> Path:
    """A copy of `src` with new UIDs (so it is not the same instance) and `changes` applied;
    a change is (VR, value) for an attribute written with that VR."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = pydicom.uid.generate_uid(prefix="1.2.826.0.1.3680043.10.2.")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, change in changes.items():
        tag = pydicom.datadict.tag_for_keyword(keyword)
        if keyword in ds:
            del ds[keyword]
        if isinstance(change, tuple):
            ds.add_new(tag, *change)
        else:
            setattr(ds, keyword, change)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture
def original(encoded_corpus: EncodedCorpus) -> Path:
    return encoded_corpus.study.ct_files[0]


def test_wrong_vr_is_quarantined_and_the_batch_commits(tmp_path: Path, targets: Archive,
                                                        encoded_corpus: EncodedCorpus, original: Path) -> None:
    bad = [
        _variant(original, tmp_path / "sex_ss.dcm", PatientSex=("SS", 5)),
        _variant(original, tmp_path / "position_sl.dcm", ImagePositionPatient=("SL", 7)),
        _variant(original, tmp_path / "rows_text.dcm", SeriesNumber=("FD", 1e300)),
        _variant(original, tmp_path / "huge_int.dcm", InstanceNumber=("IS", "99999999999999999999")),
        _variant(original, tmp_path / "nan_position.dcm", ImagePositionPatient=("DS", ["nan", "0", "0"])),
    ]
    report = ingest_files(bad + encoded_corpus.study.ct_files, targets, remove_sources=False)
    assert report.summary()["indexed"] == len(encoded_corpus.study.ct_files), report.reasons
    by_name = {Path(f.source).name: f for f in report.files}
    for path in bad:
        assert by_name[path.name].status == "quarantined", path.name
        assert by_name[path.name].reason == Reason.MALFORMED, (path.name, by_name[path.name].error)
    assert "PatientSex" in by_name["sex_ss.dcm"].error


def test_a_huge_instance_number_costs_no_memory(tmp_path: Path, targets: Archive, original: Path) -> None:
    """InstanceNumber 2147483647 beside InstanceNumber 1: the series row lists a bounded
    number of gaps, and the ingest allocates nothing in proportion to the value."""
    files = [_variant(original, tmp_path / "last.dcm", InstanceNumber=2147483647)]
    files.append(_variant(original, tmp_path / "first.dcm", InstanceNumber=1))
    tracemalloc.start()
    report = ingest_files(files, targets, remove_sources=False, workers=1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert report.summary()["indexed"] == 2
    series = targets.lake.read(SERIES).row(0, named=True)
    assert series["complete"] is False and len(series["missing_instance_numbers"]) == 1000
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def _with_referenced_series(src: Path, out: Path, items: int) -> Path:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = pydicom.uid.generate_uid(prefix="1.2.826.0.1.3680043.10.3.")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    item = Dataset()
    item.SeriesInstanceUID = "1.2.3"
    ds.ReferencedSeriesSequence = Sequence([item] * items)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_item_counts_are_bounded(tmp_path: Path, targets: Archive, original: Path) -> None:
    """A referenced-series sequence of 1,000,000 items is refused as exceeding the limits
    (it took 110 s when the walker copied the rest of the file for each item); 50,000 items,
    within the bound, are walked in linear time and indexed."""
    over = _with_referenced_series(original, tmp_path / "over.dcm", elements.MAX_ITEMS + 1)
    within = _with_referenced_series(original, tmp_path / "within.dcm", 50_000)
    report = ingest_files([over, within], targets, remove_sources=False, workers=1)
    outcome = {Path(f.source).name: (f.status, f.reason) for f in report.files}
    assert outcome["over.dcm"] == ("quarantined", Reason.EXCEEDS_LIMITS)
    assert outcome["within.dcm"][0] == "indexed"


def test_nesting_is_bounded(tmp_path: Path, targets: Archive, original: Path) -> None:
    """60 levels of undefined-length sequences (walked recursively): refused at 16."""
    ds = pydicom.dcmread(original)
    ds.SOPInstanceUID = pydicom.uid.generate_uid(prefix="1.2.826.0.1.3680043.10.4.")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    inner = Dataset()
    for _ in range(60):
        outer = Dataset()
        outer.ReferencedImageSequence = Sequence([inner])
        outer["ReferencedImageSequence"].is_undefined_length = True
        inner.is_undefined_length_sequence_item = True
        inner = outer
    ds["ReferencedImageSequence"] = inner["ReferencedImageSequence"]
    path = tmp_path / "deep.dcm"
    ds.save_as(path, enforce_file_format=True)
    report = ingest_files([path], targets, remove_sources=False)
    assert report.reasons == {Reason.EXCEEDS_LIMITS: 1}


def test_file_name_that_is_not_utf8(tmp_path: Path, targets: Archive, original: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    name = os.fsdecode(b"IM\xff\xfe-latin1-\xe9.dcm")
    (spool / name).write_bytes(original.read_bytes())
    (spool / os.fsdecode(b"junk-\xff.dcm")).write_bytes(b"not dicom at all")
    report = ingest_files(list(spool.iterdir()), targets, remove_sources=True)
    assert report.summary()["indexed"] == 1 and report.summary()["quarantined"] == 1
    q = targets.lake.read(QUARANTINE)
    assert q["source_path"][0].endswith("junk-\\xff.dcm")
    assert list(spool.iterdir()) == []


def test_links_in_the_spool_are_never_followed(tmp_path: Path, home: KaapanaHome, targets: Archive,
                                               original: Path) -> None:
    """A symbolic link (to a DICOM file outside the home) and a FIFO in the spool: recorded as
    not_regular_file, never read or linked into the archive; the link goes, its target stays."""
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(original.read_bytes())
    spool = home.incoming / "sender"
    spool.mkdir(parents=True)
    (spool / "link.dcm").symlink_to(outside)
    os.mkfifo(spool / "pipe.dcm")
    report = ingest_files(list(spool.iterdir()), targets, remove_sources=True)
    assert report.reasons == {Reason.NOT_REGULAR_FILE: 2}
    assert outside.read_bytes() == original.read_bytes()
    assert list(spool.iterdir()) == []
    archived = [p for p in home.archive.rglob("*") if not p.is_dir()]
    assert all(p.is_file() and not p.is_symlink() for p in archived)
    assert targets.lake.read(INSTANCES).height == 0
    q = targets.lake.read(QUARANTINE)
    assert q["quarantine_path"].is_null().all() and "symbolic link" in " ".join(q["error"].to_list())


def test_series_under_a_second_study_is_a_conflict(tmp_path: Path, targets: Archive, original: Path) -> None:
    first = _variant(original, tmp_path / "a.dcm")
    ingest_files([first], targets, remove_sources=False)
    second = _variant(original, tmp_path / "b.dcm", StudyInstanceUID="1.2.826.0.1.3680043.10.5.1")
    report = ingest_files([second], targets, remove_sources=False)
    assert report.reasons == {Reason.SERIES_CONFLICT: 1}
    series = targets.lake.read(SERIES)
    assert series.height == 1 and series["instance_count"][0] == 1
    assert series["study_uid"][0] == pydicom.dcmread(original).StudyInstanceUID


def test_sop_conflict_under_another_study_leaves_no_orphan(tmp_path: Path, home: KaapanaHome,
                                                           targets: Archive, original: Path) -> None:
    first = _variant(original, tmp_path / "a.dcm")
    ingest_files([first], targets, remove_sources=False)
    ds = pydicom.dcmread(first)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.6.1", "1.2.826.0.1.3680043.10.6.2"
    ds.save_as(tmp_path / "moved.dcm")
    report = ingest_files([tmp_path / "moved.dcm"], targets, remove_sources=False)
    assert report.reasons == {Reason.SOP_CONFLICT: 1}
    referenced = {home.archive / p for p in targets.lake.read(INSTANCES)["archive_path"].to_list()}
    archived = {p for p in home.archive.rglob("*.dcm")}
    assert archived == referenced


WORKERS_SCRIPT = """
import sys, time
from pathlib import Path
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest import pipeline
files = sorted(Path(sys.argv[1]).rglob("*.dcm")) * 0
pool = pipeline._pool(2)
list(pool.map(abs, range(4)))  # the workers are up
print("ready", flush=True)
time.sleep(600)
"""


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_pool_workers_die_with_the_ingest_process(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WORKERS_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        workers = [p for p in _children(proc.pid) if "spawn" in (Path("/proc") / str(p) / "cmdline").read_text()]
        assert len(workers) >= 2, workers
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), "pool workers outlived the killed ingest"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# 32 bytes the fuzzer wrote at offset 1903 of pydicom's rtdose_rle.dcm (inside an RLE
# segment): pylibjpeg-rle panics on them (a Rust PanicException, a BaseException).
RLE_PANIC = bytes.fromhex("32e1b224b181de34a3f2d3a1cfb725bd73b265bd5ee64b293d16e6834d2facf1")


def test_a_codec_panic_is_a_conflict_not_a_crash(tmp_path: Path, targets: Archive) -> None:
    """The same SOP Instance again with corrupted RLE pixels: comparing the encodings decodes
    them, the codec panics, and the file is a sop_conflict — the ingest goes on."""
    original = Path(pydicom.__file__).parent / "data" / "test_files" / "rtdose_rle.dcm"
    data = bytearray(original.read_bytes())
    data[1903:1935] = RLE_PANIC
    corrupted = tmp_path / "rtdose_rle_corrupted.dcm"
    corrupted.write_bytes(bytes(data))
    ingest_files([original], targets, remove_sources=False)
    report = ingest_files([corrupted], targets, remove_sources=False)
    assert report.reasons == {Reason.SOP_CONFLICT: 1}
