"""What the DICOMweb service serves, passed down from the process that starts it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kaapana_assets.access.audit import AuditLog
from kaapana_assets.lake import Lake

# Where the DICOMweb resources live under the service's base URL (Orthanc's convention); the
# viewer is served at the root, since OHIF's published build expects PUBLIC_URL "/".
DICOMWEB_ROOT = "/dicom-web"


@dataclass(frozen=True)
class DicomwebConfig:
    lake: Lake  # the index: instances, series, studies
    archive: Path  # the DICOM files the index names (archive_path is relative to it)
    incoming: Path  # the spool STOW-RS stores into, as the C-STORE receiver does
    stow: bool = False  # read-only unless STOW-RS is enabled
    viewer_dir: Path | None = None  # OHIF's built dist/, served at "/" when given
    stow_max_bytes: int = 4 * 2**30  # the largest STOW-RS body taken (413 beyond)
    # Behind the gateway: the secret of its signed identity header. Every request must then
    # carry one, and sees only its projects' series (dicomweb/access.py).
    identity_secret: bytes | None = None
    audit: AuditLog | None = None  # where accesses are recorded (with identity_secret)
