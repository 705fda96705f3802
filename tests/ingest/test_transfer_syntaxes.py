"""Real hospital DICOM: every transfer syntax a PACS sends is parsed like pydicom parses
it, decoded to the same pixels, indexed, assembled into the same volume as dcm2niix's,
and recognised as the same instance when it arrives again in another encoding.

The files come from peers nobody here wrote: dcmtk, GDCM and OpenJPH re-encode the
synthetic series, and pydicom's own wheel ships the rest."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from kaapana_assets.archive.service import Archive
from kaapana_assets.ingest.headers import Reason, Rejected, _pydicom_values, parse_header, validate
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.ingest.volume import VolumeError, assemble_volume
from kaapana_assets.lake.schemas import INSTANCE_ENCODINGS, INSTANCES, QUARANTINE, SERIES
from kaapana_assets.synthetic.transcode import BY_NAME, ENCODINGS
from tests.helpers import PYDICOM_DATA, EncodedCorpus

LOSSLESS = [e.name for e in ENCODINGS if e.lossless]


def _outcome(fn, data: bytes):  # type: ignore[no-untyped-def]
    try:
        return fn(data)
    except Rejected as exc:
        return exc.reason


def _reference(data: bytes):  # type: ignore[no-untyped-def]
    return validate(*_pydicom_values(data))


def test_every_encoder_was_there(encoded_corpus: EncodedCorpus) -> None:
    """dcmtk, GDCM's tools and OpenJPH are required: no syntax silently drops out of the corpus."""
    assert set(encoded_corpus.series) == {e.name for e in ENCODINGS}


def test_walker_equals_pydicom_on_every_encoding(encoded_corpus: EncodedCorpus) -> None:
    """Every header field we index, for every file in every syntax, equals pydicom's reading."""
    files = [f for fs in encoded_corpus.series.values() for f in fs] + list(encoded_corpus.segs.values())
    for path in files:
        data = path.read_bytes()
        ours, reference = _outcome(parse_header, data), _outcome(_reference, data)
        assert ours == reference, path
        if path.parent.parent.name == "jpeg_extended":  # 12-bit: no BSD/MIT decoder (see test below)
            assert ours == Reason.NO_CODEC
        else:
            assert not isinstance(ours, Reason), (path, ours)


@pytest.mark.tools("dcmdump")
def test_walker_equals_pydicom_on_pydicom_files() -> None:
    """pydicom's shipped files: same outcome on both paths (same header or same reason), and
    a file pydicom reads whole with its pixels is never quarantined as truncated."""
    files = sorted(p for p in PYDICOM_DATA.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc", ".json"))
    compared = encapsulated = 0
    for path in files:
        data = path.read_bytes()
        ours, reference = _outcome(parse_header, data), _outcome(_reference, data)
        if ours == Reason.TRUNCATED:
            # A length field points past the end of the file. pydicom reads such files
            # leniently, so another reader confirms: pydicom refuses it, or dcmtk's dcmdump
            # reports the premature end (rtplan_truncated.dcm: pydicom accepts, dcmdump does not).
            if not isinstance(reference, Reason):
                dump = subprocess.run(["dcmdump", str(path)], capture_output=True, text=True, timeout=60)
                assert "premature end of stream" in dump.stdout + dump.stderr, path
            continue
        assert ours == reference, path
        if isinstance(ours, Reason):
            continue
        compared += 1
        encapsulated += pydicom.uid.UID(ours.transfer_syntax_uid).is_encapsulated
    assert compared > 100 and encapsulated > 25, (compared, encapsulated)


@pytest.mark.parametrize("encoding", LOSSLESS)
def test_lossless_pixels_and_uids_survive(encoded_corpus: EncodedCorpus, encoding: str) -> None:
    """Decoded pixels equal the uncompressed original, and the SOP Instance UID is kept."""
    for original, encoded in zip(encoded_corpus.study.ct_files, encoded_corpus.series[encoding], strict=True):
        a, b = pydicom.dcmread(original), pydicom.dcmread(encoded)
        assert str(b.file_meta.TransferSyntaxUID) == BY_NAME[encoding].transfer_syntax
        assert b.SOPInstanceUID == a.SOPInstanceUID
        assert np.array_equal(a.pixel_array, b.pixel_array), encoded


def test_every_syntax_is_indexed_and_assembles(tmp_path: Path, encoded_corpus: EncodedCorpus) -> None:
    """Each encoding ingested into its own home: all indexed (12-bit JPEG Extended goes to
    quarantine as no_codec, naming the syntax), and the archived series assembles into the
    original volume (lossless) or one within the lossy codec's error."""
    original = assemble_volume(encoded_corpus.study.ct_files)
    for encoding, files in encoded_corpus.series.items():
        targets = Archive.for_home(__import__("kaapana_assets.home", fromlist=["KaapanaHome"]).KaapanaHome(
            tmp_path / encoding).ensure())
        report = ingest_files(files, targets, remove_sources=False)
        if encoding == "jpeg_extended":
            assert report.reasons == {Reason.NO_CODEC: len(files)}
            q = targets.lake.read(QUARANTINE)
            assert all("1.2.840.10008.1.2.4.51" in e for e in q["error"].to_list())
            continue
        assert report.summary()["indexed"] == len(files), (encoding, report.reasons)
        rows = targets.lake.read(INSTANCES)
        assert set(rows["transfer_syntax_uid"].to_list()) == {BY_NAME[encoding].transfer_syntax}
        volume = assemble_volume([targets.root / p for p in rows["archive_path"].to_list()])
        assert volume.hu.shape == original.hu.shape
        assert np.allclose(volume.spacing_zyx, original.spacing_zyx) and np.allclose(volume.origin, original.origin)
        if BY_NAME[encoding].lossless:
            assert np.array_equal(volume.hu, original.hu), encoding
        else:
            assert float(np.mean(np.abs(volume.hu - original.hu))) < 100, encoding


def test_same_instance_in_another_encoding(tmp_path: Path, encoded_corpus: EncodedCorpus) -> None:
    """A lossless re-encoding of an indexed instance is the same instance (already indexed,
    the alternate recorded); different pixels under the same UID stay a conflict."""
    from kaapana_assets.home import KaapanaHome

    targets = Archive.for_home(KaapanaHome(tmp_path / "home").ensure())
    first = ingest_files(encoded_corpus.study.ct_files, targets, remove_sources=False)
    assert first.summary()["indexed"] == len(encoded_corpus.study.ct_files)
    again = ingest_files(encoded_corpus.series["jpeg_lossless_sv1"] + encoded_corpus.series["jpeg2000_lossless"],
                         targets, remove_sources=False)
    assert again.summary() == {"indexed": 0, "already_indexed": 12, "quarantined": 0, "failed": 0}
    alternates = targets.lake.read(INSTANCE_ENCODINGS)
    assert alternates.height == 12
    assert set(alternates["transfer_syntax_uid"].to_list()) == {"1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90"}
    assert set(alternates["archived_transfer_syntax_uid"].to_list()) == {"1.2.840.10008.1.2.1"}
    assert targets.lake.read(INSTANCES).height == 6  # the archive keeps the first encoding

    changed = pydicom.dcmread(encoded_corpus.series["rle"][0])
    pixels = changed.pixel_array.copy()
    pixels[0, 0] += 1
    changed.PixelData = pixels.tobytes()
    changed.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    changed.compress(pydicom.uid.RLELossless, pixels, generate_instance_uid=False)
    path = tmp_path / "changed.dcm"
    changed.save_as(path)
    conflict = ingest_files([path], targets, remove_sources=False)
    assert conflict.reasons == {Reason.SOP_CONFLICT: 1}, [(f.status, f.reason, f.error, f.sop_uid) for f in conflict.files]


def test_enhanced_multiframe_is_refused_with_a_reason(tmp_path: Path, encoded_corpus: EncodedCorpus) -> None:
    """A multi-frame CT (highdicom's legacy converter turns the series into one Legacy
    Converted Enhanced CT file): indexed, its series row says why it is not a volume, the
    automation does not pick it, and assembly refuses it instead of mis-assembling frames."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage
    from pydicom.uid import generate_uid

    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.segmentation.segment import NothingToSegment, source_series

    legacy = [pydicom.dcmread(f) for f in encoded_corpus.study.ct_files]
    enhanced = LegacyConvertedEnhancedCTImage(legacy, generate_uid(prefix="1.2.826.0.1.3680043.10.1."), 99,
                                              generate_uid(prefix="1.2.826.0.1.3680043.10.1."), 1)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path)
    targets = Archive.for_home(KaapanaHome(tmp_path / "home").ensure())
    report = ingest_files([path], targets, remove_sources=False)
    assert report.summary()["indexed"] == 1
    issue = targets.lake.read(SERIES)["volume_issue"][0]
    assert issue and "Legacy Converted Enhanced CT" in issue and "6 frames" in issue
    with pytest.raises(NothingToSegment, match="Legacy Converted Enhanced CT"):
        source_series(targets.lake, encoded_corpus.study.study_uid)
    with pytest.raises(VolumeError, match="Legacy Converted Enhanced CT"):
        assemble_volume([targets.root / targets.lake.read(INSTANCES)["archive_path"][0]])


DCM2NIIX_SYNTAXES = ["explicit_le", "implicit_le", "explicit_be", "jpeg_lossless", "jpeg_lossless_sv1", "rle",
                     "jpeg2000_lossless"]  # Debian's dcm2niix is built without JPEG-LS and HTJ2K


@pytest.mark.tools("dcm2niix")
@pytest.mark.parametrize("encoding", DCM2NIIX_SYNTAXES)
def test_volume_matches_dcm2niix(tmp_path: Path, encoded_corpus: EncodedCorpus, encoding: str) -> None:
    """dcm2niix as the oracle: same voxel values after rescale, same affine within 1e-3 mm."""
    import SimpleITK as sitk

    files = encoded_corpus.series[encoding]
    source = tmp_path / "series"
    source.mkdir()
    for f in files:
        shutil.copy(f, source / f.name)
    out = tmp_path / "nifti"
    out.mkdir()
    done = subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "volume", "-o", str(out), str(source)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    oracle = sitk.DICOMOrient(sitk.ReadImage(str(out / "volume.nii"), sitk.sitkFloat32), "LPS")
    ours = sitk.DICOMOrient(assemble_volume(files).sitk_image(), "LPS")
    assert oracle.GetSize() == ours.GetSize()
    assert np.allclose(oracle.GetSpacing(), ours.GetSpacing(), atol=1e-3)
    assert np.allclose(oracle.GetOrigin(), ours.GetOrigin(), atol=1e-3)
    assert np.allclose(oracle.GetDirection(), ours.GetDirection(), atol=1e-3)
    assert np.array_equal(sitk.GetArrayFromImage(oracle), sitk.GetArrayFromImage(ours))
