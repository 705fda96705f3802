"""The Debian tools tests use as peers and oracles. A missing one fails its test with one line
naming the package and the command that installs it (`make tools`, from .ci/debian-packages)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES_FILE = REPO / ".ci" / "debian-packages"

# executable (or file) -> the Debian package that ships it
TOOLS: dict[str, str] = {
    **dict.fromkeys(("storescu", "storescp", "dcmdump", "dcmconv", "dcmcjpeg", "dcmcjpls", "dcmcrle", "dcm2json"),
                    "dcmtk"),
    "dciodvfy": "dicom3tools",
    "gdcmconv": "libgdcm-tools",
    "ojph_compress": "openjph-tools",
    "dcm2niix": "dcm2niix",
    "Orthanc": "orthanc",
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so": "orthanc-dicomweb",
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "chromium": "chromium",
    "node": "nodejs",
}


def listed_packages() -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in PACKAGES_FILE.read_text().splitlines())
    return {line for line in lines if line}


def _present(tool: str) -> bool:
    return Path(tool).exists() if tool.startswith("/") else shutil.which(tool) is not None


def missing_message(*tools: str) -> str | None:
    missing = [t for t in tools if not _present(t)]
    if not missing:
        return None
    packages = " ".join(sorted({TOOLS[t] for t in missing}))
    return (f"{', '.join(missing)} not installed (Debian: {packages}): run `make tools` as root, "
            f"or `sudo apt-get install -y --no-install-recommends {packages}`")


def require(*tools: str) -> None:
    """Fail the calling test, in one line, unless every tool is installed."""
    message = missing_message(*tools)
    if message:
        pytest.fail(message, pytrace=False)


def dciodvfy_errors(path: Path) -> list[str]:
    """dicom3tools' IOD validator over one file: its Error lines (warnings pass)."""
    require("dciodvfy")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
