"""A real PACS pushes to `kaapana receive`: Orthanc (its own DCMTK-based C-STORE SCU) sends an
uncompressed study, a JPEG Lossless SV1 study and a JPEG 2000 lossless study; every instance
arrives in the spool in the transfer syntax Orthanc holds it in, byte for byte; the ingest
runs index all, and the automation segments each study into a SEG that dciodvfy accepts.

Orthanc listens on every interface, so the exchange runs inside a private network namespace
(`unshare -n`, as root): this file, run as a script, is what runs in there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pydicom
import pytest

from bench import orthanc
from kaapana_assets.lake.schemas import INSTANCES
from tests.helpers import REPO, Receiver, can_unshare, dataset_bytes
from tests.tools import dciodvfy_errors

# slow tier (`make test-all`): a real Orthanc and the receiver
pytestmark = pytest.mark.slow

STUDIES = ("uncompressed", "jpeg_lossless_sv1", "jpeg2000_lossless")


@pytest.mark.skipif(not can_unshare(), reason="needs root and unshare -n to confine Orthanc to a private loopback")
@pytest.mark.tools("gdcmconv", "dcmcjpeg", *orthanc.TOOLS)
def test_orthanc_pushes_compressed_studies_into_receiver(tmp_path: Path, corpus: dict, trained_site) -> None:  # type: ignore[no-untyped-def]
    import dagster as dg
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from kaapana_assets.ingest.assets import dicom_studies
    from kaapana_assets.ingest.spool import scan_spool
    from kaapana_assets.lake import Lake
    from kaapana_assets.segmentation.assets import segmentations
    from kaapana_assets.synthetic.transcode import transcode

    site_a = corpus["site-a"]  # unsigned pixels: every lossless codec takes them
    studies: dict[str, list[Path]] = {"uncompressed": site_a[0].files}  # CT slices and their SEG
    for name, study in zip(STUDIES[1:], site_a[1:3], strict=True):
        studies[name] = [transcode(f, tmp_path / "pacs" / name / f.name, name) for f in study.ct_files]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({name: [str(f) for f in files] for name, files in studies.items()}))

    out = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.flows.test_pacs", str(tmp_path), str(manifest)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])

    for name, files in studies.items():
        pushed = result["pushed"][name]
        assert pushed["FailedInstancesCount"] == 0 and pushed["InstancesCount"] == len(files), pushed
    assert "refused" not in result["receiver_log"], result["receiver_log"][-3000:]
    spooled = sorted(Path(f.path) for f in scan_spool(tmp_path / "home" / "incoming"))  # not the receive journal
    sent = [f for files in studies.values() for f in files]
    assert len(spooled) == len(sent)
    assert {p.parent.name for p in spooled} == {"ORTHANC"}  # the calling AE title
    by_sop = {}
    for p in spooled:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        assert ds.file_meta.SendingApplicationEntityTitle == "ORTHANC"
        by_sop[ds.SOPInstanceUID] = (ds.file_meta.TransferSyntaxUID, p)
    for f in sent:
        original = pydicom.dcmread(f, stop_before_pixels=True)
        syntax, stored = by_sop[original.SOPInstanceUID]
        assert syntax == original.file_meta.TransferSyntaxUID  # not transcoded on the way
        # Orthanc sends a stored file's data set as it is when the receiver accepts its syntax.
        assert dataset_bytes(stored) == dataset_bytes(f)
    by_sop = {uid: syntax for uid, (syntax, _) in by_sop.items()}
    assert {str(ts) for ts in by_sop.values()} == {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70",
                                                  "1.2.840.10008.1.2.4.90"}

    # The site's own path from here: the spool files go through one ingest run over the
    # studies' partition range (they arrived together: the sensor's burst), and the automation
    # segments each study with the production model into a SEG that dciodvfy accepts.
    spool = trained_site.home.incoming / "ORTHANC"
    spool.mkdir(parents=True, exist_ok=True)
    for p in spooled:
        shutil.copy(p, spool / p.name)
    study_uids = sorted({str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in sent})
    instance = trained_site.instance
    instance.add_dynamic_partitions("studies", study_uids)
    defs = dg.Definitions(assets=[dicom_studies, segmentations], resources=trained_site.resources)
    before = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    burst = dg.materialize([dicom_studies], instance=instance, resources=trained_site.resources,
                           tags={ASSET_PARTITION_RANGE_START_TAG: study_uids[0],
                                 ASSET_PARTITION_RANGE_END_TAG: study_uids[-1]})
    assert burst.success
    assert burst.asset_materializations_for_node("dicom_studies")[0].metadata["study_count"].value == len(study_uids)
    assert set(study_uids) <= instance.get_materialized_partitions(dg.AssetKey("dicom_studies"))
    lake = Lake(trained_site.home.lake)
    indexed = lake.read(INSTANCES).filter(pl.col("study_uid").is_in(study_uids))
    assert indexed.height == len(sent)
    evaluation = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
    requested = evaluation.get_requested_partitions(dg.AssetKey("segmentations"))
    assert set(study_uids) <= requested
    for study_uid in study_uids:
        run = dg.materialize([segmentations], partition_key=study_uid, instance=instance,
                             resources=trained_site.resources)
        assert run.success
        md = run.asset_materializations_for_node("segmentations")[0].metadata
        seg = lake.read(INSTANCES, pl.col("sop_instance_uid") == md["seg_sop_instance_uid"].value)
        errors = dciodvfy_errors(trained_site.home.archive / seg["archive_path"][0])
        assert errors == [], (study_uid, errors)


def _in_namespace(workdir: Path, manifest: Path) -> None:
    """Inside `unshare -n`: Orthanc and `kaapana receive` on the namespace's own loopback;
    upload each study over REST, then let Orthanc push it. Prints the outcome as JSON."""
    sys.path.insert(0, str(REPO))
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    from bench.orthanc import Orthanc

    studies = {name: [Path(f) for f in files] for name, files in json.loads(manifest.read_text()).items()}
    receiver = Receiver(workdir / "home")
    pacs = None
    try:
        pacs = Orthanc(workdir / "orthanc")
        pacs.add_modality("kaapana", "KAAPANA", "127.0.0.1", receiver.port)
        pushed = {}
        for name, files in studies.items():
            study_ids = {pacs.upload(f)["ParentStudy"] for f in files}
            assert len(study_ids) == 1, study_ids
            pushed[name] = pacs.push("kaapana", sorted(study_ids))
        print(json.dumps({"pushed": pushed, "receiver_log": receiver.log()}))
    finally:
        if pacs is not None:
            pacs.stop()
        receiver.stop()


if __name__ == "__main__":
    _in_namespace(Path(sys.argv[1]), Path(sys.argv[2]))
