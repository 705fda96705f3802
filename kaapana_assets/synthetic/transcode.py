"""Re-encode DICOM files in every transfer syntax a PACS sends, with tools nobody here
wrote: dcmtk (dcmconv, dcmcjpeg, dcmcjpls, dcmcrle), GDCM's gdcmconv (JPEG 2000) and
OpenJPH's ojph_compress (HTJ2K, encapsulated with pydicom). For tests and benchmarks:
the platform must read what real PACS write, not only its own files."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import UID


@dataclass(frozen=True)
class Encoding:
    name: str
    transfer_syntax: str
    lossless: bool
    tool: str  # the executable that must be on PATH
    build: Callable[[Path, Path], list[str]] | None = None  # the command line; None: done in Python

    @property
    def available(self) -> bool:
        return shutil.which(self.tool) is not None

    @property
    def keeps_sop_instance_uid(self) -> bool:
        # dcmtk and GDCM give lossy results a new SOP Instance UID, as the standard asks.
        return self.lossless


def _cmd(*args: str) -> Callable[[Path, Path], list[str]]:
    return lambda src, dst: [args[0], *args[1:], str(src), str(dst)]


ENCODINGS: tuple[Encoding, ...] = (
    Encoding("implicit_le", "1.2.840.10008.1.2", True, "dcmconv", _cmd("dcmconv", "+ti")),
    Encoding("explicit_le", "1.2.840.10008.1.2.1", True, "dcmconv", _cmd("dcmconv", "+te")),
    Encoding("explicit_be", "1.2.840.10008.1.2.2", True, "dcmconv", _cmd("dcmconv", "+tb")),
    Encoding("deflated", "1.2.840.10008.1.2.1.99", True, "dcmconv", _cmd("dcmconv", "+td")),
    Encoding("jpeg_baseline", "1.2.840.10008.1.2.4.50", False, "dcmcjpeg", _cmd("dcmcjpeg", "+eb")),
    Encoding("jpeg_extended", "1.2.840.10008.1.2.4.51", False, "dcmcjpeg", _cmd("dcmcjpeg", "+ee")),
    Encoding("jpeg_lossless", "1.2.840.10008.1.2.4.57", True, "dcmcjpeg", _cmd("dcmcjpeg", "+el")),
    Encoding("jpeg_lossless_sv1", "1.2.840.10008.1.2.4.70", True, "dcmcjpeg", _cmd("dcmcjpeg", "+e1")),
    Encoding("jpeg_ls_lossless", "1.2.840.10008.1.2.4.80", True, "dcmcjpls", _cmd("dcmcjpls", "+el")),
    Encoding("jpeg_ls_near_lossless", "1.2.840.10008.1.2.4.81", False, "dcmcjpls", _cmd("dcmcjpls", "+en")),
    Encoding("rle", "1.2.840.10008.1.2.5", True, "dcmcrle", _cmd("dcmcrle")),
    Encoding("jpeg2000_lossless", "1.2.840.10008.1.2.4.90", True, "gdcmconv", _cmd("gdcmconv", "--j2k")),
    Encoding("jpeg2000", "1.2.840.10008.1.2.4.91", False, "gdcmconv", _cmd("gdcmconv", "--j2k", "--lossy", "-q", "80")),
    Encoding("htj2k_lossless", "1.2.840.10008.1.2.4.201", True, "ojph_compress"),
)
BY_NAME = {e.name: e for e in ENCODINGS}


class TranscodeError(RuntimeError):
    pass


def _htj2k(src: Path, dst: Path) -> None:
    """HTJ2K lossless with OpenJPH (one codestream per frame), encapsulated by pydicom."""
    ds = pydicom.dcmread(src)
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    if int(ds.PixelRepresentation) == 1:
        # Seen here: ojph_compress reads .yuv samples as unsigned and clips signed ones.
        raise TranscodeError("htj2k_lossless: OpenJPH's raw reader takes unsigned samples only")
    streams = []
    with tempfile.TemporaryDirectory() as tmp:
        raw, j2c = Path(tmp) / "frame.yuv", Path(tmp) / "frame.j2c"  # ojph reads raw samples as .yuv
        for frame in frames:
            raw.write_bytes(np.ascontiguousarray(frame, dtype="<u2").tobytes())
            _run(["ojph_compress", "-i", str(raw), "-o", str(j2c), "-num_comps", "1",
                  "-signed", "false", "-bit_depth", str(int(ds.BitsStored)),
                  "-dims", f"{{{ds.Columns},{ds.Rows}}}", "-downsamp", "{1,1}", "-reversible", "true"])
            streams.append(j2c.read_bytes())
    ds.PixelData = encapsulate(streams)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.201")
    ds.save_as(dst, enforce_file_format=True)


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise TranscodeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[:400]}")


def transcode(src: Path, dst: Path, encoding: Encoding | str) -> Path:
    """`src` re-encoded as `encoding` into `dst`; checks that the tool wrote that syntax."""
    encoding = BY_NAME[encoding] if isinstance(encoding, str) else encoding
    if not encoding.available:
        raise TranscodeError(f"{encoding.tool} is not installed (needed for {encoding.name})")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if encoding.build is None:
        _htj2k(src, dst)
    else:
        _run(encoding.build(src, dst))
    written = str(pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    if written != encoding.transfer_syntax:
        raise TranscodeError(f"{encoding.name}: {encoding.tool} wrote {written}, not {encoding.transfer_syntax}")
    return dst


def transcode_tree(src_files: list[Path], out: Path, encoding: Encoding | str, root: Path) -> list[Path]:
    """Every file re-encoded under out/<encoding>/..., keeping paths relative to `root`."""
    encoding = BY_NAME[encoding] if isinstance(encoding, str) else encoding
    return [transcode(f, out / encoding.name / f.relative_to(root), encoding) for f in src_files]
