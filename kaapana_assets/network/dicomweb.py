"""An external PACS as a source: search it with QIDO-RS and retrieve studies with WADO-RS
(dicomweb-client) into the spool, where the incoming_studies sensor picks them up."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from kaapana_assets.dicom.uids import require_uid
from kaapana_assets.network.spool_writer import safe_ae_title, spool_name, write_durably

log = logging.getLogger("kaapana.dicomweb")


@dataclass
class StudyMatch:
    study_uid: str
    patient_id: str | None
    study_date: str | None
    modalities: list[str]

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> "StudyMatch":
        def value(tag: str) -> Any:
            values = item.get(tag, {}).get("Value") or [None]
            return values if tag == "00080061" else values[0]

        return cls(study_uid=value("0020000D"), patient_id=value("00100020"), study_date=value("00080020"),
                   modalities=[m for m in value("00080061") if m])


class DicomWebSource:
    def __init__(self, url: str, name: str = "dicomweb", headers: dict[str, str] | None = None):
        from dicomweb_client.api import DICOMwebClient

        self.url, self.name = url.rstrip("/"), name
        self.client = DICOMwebClient(url=self.url, headers=headers)

    def search_studies(self, **filters: str) -> list[StudyMatch]:
        """QIDO-RS, e.g. search_studies(PatientID="P1", ModalitiesInStudy="CT")."""
        return [StudyMatch.from_json(item) for item in self.client.search_for_studies(search_filters=filters or None)]

    def retrieve_study(self, study_uid: str, spool: Path) -> list[Path]:
        """WADO-RS the study's instances into spool/<source>/, each written durably."""
        require_uid(study_uid, "StudyInstanceUID")
        folder = spool / safe_ae_title(self.name)
        written = []
        for ds in self.client.retrieve_study(study_uid):
            data = _part10(ds)
            written.append(write_durably(folder, spool_name(ds.get("SOPInstanceUID"), data), data))
        log.info("retrieved %d instance(s) of %s from %s", len(written), study_uid, self.url)
        return written


def _part10(ds: pydicom.Dataset) -> bytes:
    """The dataset as a Part 10 file (WADO-RS hands over data sets; the file meta is made here)."""
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
