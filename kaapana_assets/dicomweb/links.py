"""Links into the OHIF viewer this service serves: one study, or one study with one of its
series (a SEG) opened in the viewport. The one place such a URL is built."""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit

from kaapana_assets.dicom.uids import require_uid

# OHIF v3's modes are routes: `viewer` (basic viewer) shows the study; `segmentation` has the
# segmentation panel open on the right, where a SEG's segments are listed with their labels.
STUDY_MODE = "viewer"
SEGMENTATION_MODE = "segmentation"


def viewer_url(base: str, study_uid: str, series_uid: str | None = None) -> str:
    """The viewer showing `study_uid`; with `series_uid` (a SEG), in segmentation mode with that
    series hung first: OHIF overlays the SEG on the CT it references and lists its segments.

    `base` is where the service answers (KAAPANA_VIEWER_URL, e.g. http://127.0.0.1:8080).
    The UIDs are checked against the UID grammar: they come from DICOM files."""
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"the viewer's base URL must be http(s)://host[:port][/path], not {base!r}")
    query: list[tuple[str, str]] = [("StudyInstanceUIDs", require_uid(study_uid, "StudyInstanceUID"))]
    mode = STUDY_MODE
    if series_uid is not None:
        # initialSeriesInstanceUID: the hanging protocol puts this series in the first viewport
        # (OHIF's isDisplaySetFromUrl); the study's other series stay in the study browser.
        query.append(("initialSeriesInstanceUID", require_uid(series_uid, "SeriesInstanceUID")))
        mode = SEGMENTATION_MODE
    return f"{base.rstrip('/')}/{mode}?{urlencode(query)}"
