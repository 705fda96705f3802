"""Pixels of archived instances for WADO-RS: frames as stored or uncompressed, whole instances
transcoded to Explicit VR Little Endian, and rendered images.

What we give without re-encoding anything we cannot decode losslessly:
- as stored (`transfer-syntax=*`, or the syntax the file is in): the file's bytes;
- Explicit VR Little Endian (PS3.18's default) from Implicit VR Little Endian, Deflated
  Explicit VR Little Endian and every encapsulated syntax pydicom has an installed decoder for
  (decompressed with pydicom; the SOP Instance UID is kept: the pixels are those the stored
  encoding holds, a lossy one's included);
- not: Explicit VR Big Endian to little endian (pydicom does not convert it; retired since
  2004), and any compressed syntax other than the stored one (we never encode): 406."""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_rescale, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from kaapana_assets.dicomweb.metadata import PIXEL_DATA, read_header

# The media type of an encapsulated syntax's frames (PS3.18 Table 8.7.3-2).
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
OCTET_STREAM = "application/octet-stream"
# Native syntaxes whose pixel bytes in the file are already those of Explicit VR Little Endian.
LITTLE_ENDIAN_NATIVE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}


class FrameOutOfRange(LookupError):
    pass


def is_encapsulated(transfer_syntax: str) -> bool:
    return UID(transfer_syntax).is_encapsulated


def decodable(transfer_syntax: str) -> bool:
    """Whether an installed pydicom decoder reads this (encapsulated) syntax."""
    try:
        return bool(get_decoder(UID(transfer_syntax)).is_available)
    except NotImplementedError:
        return False


def can_give_explicit_le(transfer_syntax: str) -> bool:
    if transfer_syntax == ExplicitVRBigEndian:
        return False
    if is_encapsulated(transfer_syntax):
        return decodable(transfer_syntax)
    return True


def explicit_le_bytes(path: Path) -> bytes:
    """The instance as a Part 10 file in Explicit VR Little Endian (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        syntax = ds.file_meta.TransferSyntaxUID
        if syntax.is_encapsulated:
            ds.decompress(generate_instance_uid=False)
        elif syntax != ExplicitVRLittleEndian:
            if syntax == ExplicitVRBigEndian:
                raise ValueError("Explicit VR Big Endian is not converted")
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # implicit or deflated: re-encoded by pydicom
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read_full(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


@dataclass(frozen=True)
class PixelLayout:
    frames: int
    frame_bytes: int  # of one native frame (0 for BitsAllocated 1: frames are not byte-aligned)
    offset: int | None  # where the PixelData value starts in the file (see `layout`)
    transfer_syntax: str

    @property
    def native_in_place(self) -> bool:
        """Uncompressed frames that are read from the file as they are."""
        return self.offset is not None and self.transfer_syntax in LITTLE_ENDIAN_NATIVE


def cached_layout(path: Path) -> PixelLayout:
    """`layout` without the data set, cached by the file's identity (archived files are written
    once; the size and modification time guard against a replaced one)."""
    stat = path.stat()
    return _cached_layout(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16384)
def _cached_layout(path: Path, size: int, mtime_ns: int) -> PixelLayout:
    return layout(path)[1]


def layout(path: Path) -> tuple[Dataset, PixelLayout]:
    ds = read_header(path)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if raw is None:
        raise FrameOutOfRange(f"{path.name} holds no pixel data")
    frames = int(ds.get("NumberOfFrames") or 1)
    bits = int(ds.get("BitsAllocated") or 8)
    samples = int(ds.get("SamplesPerPixel") or 1)
    pixels = int(ds.Rows) * int(ds.Columns) * samples
    frame_bytes = pixels * bits // 8 if bits % 8 == 0 else 0
    # where the value starts in the file: native little endian (frames read in place) and
    # encapsulated (items read in place); None for deflated and big endian files
    offset = getattr(raw, "value_tell", None) if syntax in LITTLE_ENDIAN_NATIVE or UID(syntax).is_encapsulated else None
    return ds, PixelLayout(frames, frame_bytes, offset, syntax)


def check_frames(numbers: list[int], frames: int) -> None:
    bad = [n for n in numbers if not 1 <= n <= frames]
    if bad:
        raise FrameOutOfRange(f"frame {bad[0]} out of range: the instance has {frames} frame(s)")


def stored_frames(path: Path, numbers: list[int]) -> list[bytes]:
    """Frames of an encapsulated instance, each as stored (its compressed codestream)."""
    pixel_layout = cached_layout(path)
    check_frames(numbers, pixel_layout.frames)
    if pixel_layout.offset is not None:  # the items from the file, up to its end (the delimiter ends them)
        with open(path, "rb") as file:
            file.seek(pixel_layout.offset)
            value = file.read()
    else:
        value = read_full(path).PixelData
    wanted = set(numbers)
    found: dict[int, bytes] = {}
    for number, frame in enumerate(generate_frames(value, number_of_frames=pixel_layout.frames), start=1):
        if number in wanted:
            found[number] = frame
            if len(found) == len(wanted):
                break
    return [found[n] for n in numbers]


def native_frames(path: Path, numbers: list[int]) -> list[bytes]:
    """Frames as uncompressed little-endian bytes: read in place from a little-endian native
    file; decoded (or byte-swapped, inflated) with pydicom otherwise."""
    pixel_layout = cached_layout(path)
    check_frames(numbers, pixel_layout.frames)
    offset = pixel_layout.offset
    if offset is not None and pixel_layout.native_in_place and pixel_layout.frame_bytes:
        size = pixel_layout.frame_bytes
        out = []
        with open(path, "rb") as file:
            for n in numbers:
                file.seek(offset + (n - 1) * size)
                out.append(file.read(size))
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = pydicom.dcmread(path)
        if int(full.get("BitsAllocated") or 8) == 1 and not full.file_meta.TransferSyntaxUID.is_encapsulated:
            # Bit-packed frames (SEG): unpacked to one byte per pixel would change their meaning;
            # give each frame's bits as stored when frames are byte-aligned, else refuse.
            per_frame = int(full.Rows) * int(full.Columns)
            if per_frame % 8:
                raise FrameOutOfRange("bit-packed frames that are not byte-aligned cannot be cut out")
            data = full.PixelData
            return [data[(n - 1) * per_frame // 8: n * per_frame // 8] for n in numbers]
        array = full.pixel_array
    if pixel_layout.frames == 1:
        array = array[np.newaxis]
    return [np.ascontiguousarray(array[n - 1]).astype(array.dtype.newbyteorder("<")).tobytes() for n in numbers]


def native_pixel_data(path: Path) -> bytes:
    """The whole native PixelData value, little endian (all frames, bit-packed ones as stored)."""
    ds, pixel_layout = layout(path)
    if pixel_layout.offset is not None and pixel_layout.native_in_place:
        raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
        with open(path, "rb") as file:
            file.seek(pixel_layout.offset)
            return file.read(int(getattr(raw, "length", 0)))
    return b"".join(native_frames(path, list(range(1, pixel_layout.frames + 1))))


def _window(ds: Dataset, values: np.ndarray) -> tuple[float, float]:
    """The instance's first window (center, width), or the frame's min/max."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center = center[0] if isinstance(center, pydicom.multival.MultiValue) else center
        width = width[0] if isinstance(width, pydicom.multival.MultiValue) else width
        if float(width) > 0:
            return float(center), float(width)
    low, high = float(values.min()), float(values.max())
    return (low + high) / 2, max(high - low, 1.0)


def render(path: Path, frame: int, media_type: str, size: int | None = None) -> bytes:
    """One frame as an 8-bit image (image/png or image/jpeg): rescaled to its modality
    values, then windowed (PS3.3 C.11.2.1.2, linear) or stretched over its min/max;
    `size` bounds the larger side (thumbnails)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        frames = int(ds.get("NumberOfFrames") or 1)
        check_frames([frame], frames)
        array = ds.pixel_array
    if frames > 1:
        array = array[frame - 1]
    if int(ds.get("SamplesPerPixel") or 1) == 1:
        values = apply_rescale(array, ds).astype(np.float64) if "RescaleSlope" in ds else array.astype(np.float64)
        center, width = _window(ds, values)
        low = center - 0.5 - (width - 1) / 2
        scaled = np.clip((values - low) / max(width - 1, 1.0), 0.0, 1.0) * 255.0
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            scaled = 255.0 - scaled
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    else:
        image = Image.fromarray(np.asarray(array, dtype=np.uint8), mode="RGB")
    if size is not None:
        image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if media_type == "image/png" else "JPEG", **({} if media_type == "image/png"
                                                                                  else {"quality": 90}))
    return buffer.getvalue()
