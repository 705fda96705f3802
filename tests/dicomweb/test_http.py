"""The shared DICOMweb plumbing: Accept parsing and negotiation, DICOM JSON values by VR."""

from __future__ import annotations

import pytest
from pydicom import Dataset
from starlette.exceptions import HTTPException
from starlette.requests import Request

from kaapana_assets.dicomweb.http import (
    DICOM_JSON,
    JSON,
    MediaRange,
    accepted,
    dataset_json,
    element,
    keyword_element,
    negotiate,
    require_uid,
)


def _request(accept: str | None) -> Request:
    headers = [(b"accept", accept.encode())] if accept is not None else []
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers, "query_string": b""})


def test_accept_ranges_keep_their_parameters_best_first() -> None:
    ranges = accepted(_request('multipart/related; type="application/dicom"; transfer-syntax=*; q=0.5, '
                               'application/dicom+json, */*;q=0.1'))
    assert ranges == [
        MediaRange("application/dicom+json"),
        MediaRange("multipart/related", {"type": "application/dicom", "transfer-syntax": "*"}, 0.5),
        MediaRange("*/*", {}, 0.1),
    ]
    assert accepted(_request(None)) == [MediaRange("*/*")]


@pytest.mark.parametrize(("accept", "chosen"), [
    (None, DICOM_JSON),
    ("application/json", JSON),
    ("application/*", DICOM_JSON),
    ("application/json;q=0.9, application/dicom+json", DICOM_JSON),
    ("application/dicom+xml", None),
    ("application/dicom+json;q=0", None),
])
def test_negotiate(accept: str | None, chosen: str | None) -> None:
    if chosen is None:
        with pytest.raises(HTTPException) as raised:
            negotiate(_request(accept), (DICOM_JSON, JSON))
        assert raised.value.status_code == 406
    else:
        assert negotiate(_request(accept), (DICOM_JSON, JSON)) == chosen


def test_values_by_vr_match_pydicom() -> None:
    """Our encoding of index values equals pydicom's to_json_dict of the same attributes."""
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.SeriesNumber = "3"
    ds.SliceThickness = "2.5"
    ds.Rows = 512
    ds.ModalitiesInStudy = ["CT", "SEG"]
    ds.ReferringPhysicianName = ""
    expected = dataset_json(ds)
    ours = dict(keyword_element(k, v) for k, v in (("PatientName", "Doe^Jane"), ("SeriesNumber", 3),
                                                   ("SliceThickness", 2.5), ("Rows", 512),
                                                   ("ModalitiesInStudy", ["CT", "SEG"]),
                                                   ("ReferringPhysicianName", None)))
    assert ours == expected
    assert element("PN", ["A^B=C^D"]) == {"vr": "PN", "Value": [{"Alphabetic": "A^B", "Ideographic": "C^D"}]}


def test_require_uid() -> None:
    assert require_uid("1.2.840.10008.1.2", "TransferSyntaxUID") == "1.2.840.10008.1.2"
    for bad in ("1.2.03", "../etc", "1.2." + "3" * 70):
        with pytest.raises(HTTPException) as raised:
            require_uid(bad, "StudyInstanceUID")
        assert raised.value.status_code == 400
