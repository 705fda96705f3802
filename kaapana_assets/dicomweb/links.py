"""Links into the OHIF viewer this service serves: one study, or one study with one of its SEGs
over the series it segments. The one place such a URL is built."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

from kaapana_assets.dicom.uids import require_uid

# OHIF v3's modes are routes: `viewer` (the basic viewer) shows the study; `segmentation` opens
# with its segmentation panel, which lists a SEG's segments with their labels.
STUDY_MODE = "viewer"
SEGMENTATION_MODE = "segmentation"
# OHIF's hanging protocol (extension cornerstone-dicom-seg) that puts the SEG in the viewport:
# the SEG is loaded over its referenced series, without a prompt (app-config.js).
SEG_PROTOCOL = "@ohif/seg"


@dataclass(frozen=True)
class SegView:
    """A SEG and the image series it segments (its ReferencedSeriesSequence)."""

    seg_series_uid: str
    image_series_uid: str


def viewer_url(base: str, study_uid: str, seg: SegView | None = None) -> str:
    """The viewer showing `study_uid`; with `seg`, in segmentation mode with only that SEG and
    its image series loaded (a study may hold several SEGs: the model's, the reference) and the
    SEG hung over the images.

    `base` is where the service answers (KAAPANA_VIEWER_URL, e.g. http://127.0.0.1:8080). The
    UIDs are checked against the UID grammar: they come from DICOM files."""
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"the viewer's base URL must be http(s)://host[:port][/path], not {base!r}")
    query = [("StudyInstanceUIDs", require_uid(study_uid, "StudyInstanceUID"))]
    mode = STUDY_MODE
    if seg is not None:
        series = [require_uid(seg.image_series_uid, "SeriesInstanceUID"), require_uid(seg.seg_series_uid, "SeriesInstanceUID")]
        query += [("SeriesInstanceUIDs", ",".join(series)), ("hangingProtocolId", SEG_PROTOCOL)]
        mode = SEGMENTATION_MODE
    return f"{base.rstrip('/')}/{mode}?{urlencode(query, safe=',@/')}"
