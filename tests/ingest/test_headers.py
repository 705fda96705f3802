"""Header parsing: the fast element walker agrees with pydicom; bad input is rejected with a reason."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaapana_assets.ingest.headers import Reason, Rejected, _pydicom_values, parse_header, validate
from tests.helpers import pydicom_files


def _both(data: bytes):  # type: ignore[no-untyped-def]
    fast = parse_header(data)
    reference = validate(*_pydicom_values(data))
    return fast, reference


def test_fast_path_matches_pydicom_on_synthetic(corpus: dict) -> None:
    for studies in corpus.values():
        for study in studies:
            for path in study.files:
                fast, reference = _both(path.read_bytes())
                assert fast == reference, path


def test_fast_path_matches_pydicom_on_pydicom_files() -> None:
    """Wherever both paths accept a file of pydicom's own test corpus, they agree exactly."""
    compared = 0
    for path in pydicom_files():
        data = path.read_bytes()
        try:
            fast, reference = _both(data)
        except Rejected:
            continue
        # pydicom decodes ISO 2022 character sets properly; the walker defers those to it.
        assert fast == reference, path
        compared += 1
    assert compared > 50


def test_seg_header(corpus: dict) -> None:
    study = next(s for s in corpus["site-a"] if s.lesion_count)
    header = parse_header(study.seg_file.read_bytes())
    assert header.modality == "SEG"
    assert header.referenced_series_uids == [study.series_uid]
    assert header.segment_labels == ["liver", "lesion"]


def test_truncated_file_is_rejected(corpus: dict) -> None:
    data = corpus["site-a"][0].ct_files[0].read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 400, 140):
        with pytest.raises(Rejected) as exc:
            parse_header(data[:cut])
        assert exc.value.reason in (Reason.TRUNCATED, Reason.MALFORMED, Reason.MISSING_TAG), cut


def _with(path: Path, **changes: object) -> bytes:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    "changes,reason",
    [
        ({"StudyInstanceUID": "../../etc"}, Reason.INVALID_UID),
        ({"StudyInstanceUID": "1.2.3/4"}, Reason.INVALID_UID),
        ({"SOPInstanceUID": "1.2.3.04"}, Reason.INVALID_UID),
        ({"SeriesInstanceUID": None}, Reason.MISSING_TAG),
        ({"Modality": None}, Reason.MISSING_TAG),
    ],
)
def test_bad_values_are_rejected(corpus: dict, changes: dict, reason: str) -> None:
    data = _with(corpus["site-b"][0].ct_files[0], **changes)
    with pytest.raises(Rejected) as exc:
        parse_header(data)
    assert exc.value.reason == reason
    assert exc.value.message


def test_not_dicom() -> None:
    for data in (b"", b"hello world", b"\x00" * 128 + b"DICM", b"PK\x03\x04" + b"\x00" * 300):
        with pytest.raises(Rejected) as exc:
            parse_header(data)
        assert exc.value.reason in (Reason.NOT_DICOM, Reason.MALFORMED, Reason.TRUNCATED, Reason.MISSING_TAG)


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    from kaapana_assets.synthetic import generate_site

    study = generate_site("site-c", 1, seed=2, out=tmp_path_factory.mktemp("fz"), with_annotations=True,
                          slices=4, matrix=16)[0]
    return [study.ct_files[0].read_bytes(), study.seg_file.read_bytes()]  # type: ignore[union-attr]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.integers(0, 1),
    cut=st.one_of(st.none(), st.integers(0, 4000)),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8),
)
def test_fuzzed_bytes_never_raise_anything_but_rejected(seed_files: list[bytes], which: int, cut, flips) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(seed_files[which])
    for position, value in flips:
        if position < len(data):
            data[position] = value
    if cut is not None:
        data = data[:cut]
    try:
        header = parse_header(bytes(data))
    except Rejected as exc:
        assert exc.reason and exc.message
    else:
        assert header.sop_instance_uid and header.study_uid


def test_both_parsers_read_the_qido_columns(corpus: dict) -> None:
    """The attributes QIDO-RS answers from the index (StudyTime, StudyID, ReferringPhysicianName,
    SeriesDate/Time, BitsAllocated) are read by the fast path and by pydicom alike."""
    study = next(iter(corpus.values()))[0]
    fast, reference = _both(study.ct_files[0].read_bytes())
    assert fast == reference
    ds = pydicom.dcmread(study.ct_files[0], stop_before_pixels=True)
    assert (fast.study_time, fast.study_id, fast.series_date, fast.series_time, fast.bits_allocated) == (
        ds.StudyTime, ds.StudyID, ds.SeriesDate, ds.SeriesTime, ds.BitsAllocated)
    assert fast.referring_physician_name is None  # written empty (type 2)
