"""The remote DICOM node results are sent to, and an external PACS read through DICOMweb."""

import dagster as dg
from pydantic import Field

from kaapana_assets.network.dicomweb import DicomWebSource
from kaapana_assets.network.sender import DicomNode


class DicomNodeResource(dg.ConfigurableResource):
    ae_title: str = Field(default="", description="remote AE title (e.g. the PACS); empty: sending is not configured")
    host: str = Field(default="127.0.0.1")
    port: int = Field(default=104)
    calling_ae_title: str = Field(default="KAAPANA")
    retries: int = Field(default=3)
    send_source_series: bool = Field(default=False, description="also send the segmented CT series")

    def node(self) -> DicomNode:
        if not self.ae_title:
            raise ValueError("no DICOM node configured: set KAAPANA_DICOM_NODE_AET/HOST/PORT (or the resource)")
        return DicomNode(self.ae_title, self.host, self.port)


class DicomWebResource(dg.ConfigurableResource):
    url: str = Field(default="", description="DICOMweb base URL of the external PACS (e.g. http://pacs/dicom-web)")
    name: str = Field(default="dicomweb", description="spool folder name for what is retrieved")

    def source(self) -> DicomWebSource:
        if not self.url:
            raise ValueError("no DICOMweb URL configured (KAAPANA_DICOMWEB_URL)")
        return DicomWebSource(self.url, self.name)
