"""Run inside `unshare -n`: upload a study into Orthanc over REST, pull it with our
DICOMweb source into the spool, ingest it, and print what happened as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(workdir: Path, files: list[Path]) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    from bench.orthanc import Orthanc
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.cli import main as kaapana
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.ingest.pipeline import ingest_files
    from kaapana_assets.network.dicomweb import DicomWebSource

    orthanc = Orthanc(workdir / "orthanc")
    try:
        for f in files:
            orthanc.upload(f)
        url = orthanc.url + "/dicom-web"
        matches = DicomWebSource(url).search_studies(ModalitiesInStudy="CT")
        home = KaapanaHome(workdir / "home")
        code = kaapana(["pull", "--url", url, "--study", *[m.study_uid for m in matches], "--home", str(home.root)])
        spooled = sorted(p for p in home.incoming.rglob("*.dcm"))
        report = ingest_files(spooled, Archive.for_home(home))
        print(json.dumps({"pull_exit": code, "matches": [m.__dict__ for m in matches], "spooled": len(spooled),
                          "ingest": report.summary(), "studies": report.studies}))
    finally:
        orthanc.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
