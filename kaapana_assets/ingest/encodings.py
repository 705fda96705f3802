"""The same SOP Instance in another transfer syntax. DICOM keeps the SOP Instance UID across
a lossless re-encoding (a PACS that stores JPEG Lossless sends back what it received as
Explicit VR Little Endian): equal identifying attributes and equal decoded pixels make it
the same instance, not a conflict."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
from pydicom.uid import UID

from kaapana_assets.ingest.headers import InstanceHeader, Rejected, is_native_failure, parse_header
from kaapana_assets.ingest.isolation import IsolatedFailure, run_isolated

# Where two encodings of one instance may differ: the encoding itself and who sent it.
ENCODING_FIELDS = frozenset({"transfer_syntax_uid", "calling_ae_title", "called_ae_title"})


def _identity(header: InstanceHeader) -> dict[str, object]:
    return {k: v for k, v in header.as_dict().items() if k not in ENCODING_FIELDS}


def _pixels(data: bytes) -> np.ndarray | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data))
        if "PixelData" not in ds:
            return None
        return np.asarray(ds.pixel_array)


def pixels_equal(archived: bytes, arrived: bytes) -> bool:
    """Decoded pixels equal, value for value (both absent counts as equal)."""
    a, b = _pixels(archived), _pixels(arrived)
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.array_equal(a, b))


def same_instance(archived: bytes, arrived: bytes) -> bool:
    """True when `arrived` is `archived` in another encoding: identifying attributes equal
    and decoded pixels equal, value for value. Anything unreadable is not the same.
    Compressed pixels are decoded in the isolated decoder process (hostile bytes can abort
    a codec); uncompressed ones in-process."""
    try:
        first, second = parse_header(archived), parse_header(arrived)
    except Rejected:
        return False
    if first.transfer_syntax_uid == second.transfer_syntax_uid or _identity(first) != _identity(second):
        return False
    compressed = any(UID(h.transfer_syntax_uid).is_encapsulated for h in (first, second))
    try:
        if compressed:
            return run_isolated(pixels_equal, archived, arrived)
        return pixels_equal(archived, arrived)
    except IsolatedFailure:
        return False
    except BaseException as exc:  # a decoder failing on either side: not provably the same
        if not is_native_failure(exc):
            raise
        return False
