"""The OHIF viewer on our DICOMweb, in a real browser: a synthetic CT study and its reference
SEG ingested into a home, `kaapana dicomweb --viewer` serving them (a real uvicorn process on
a free loopback port), and Debian's chromium, headless, driven by Playwright. The study list
shows the study; the study opens and its CT renders; its SEG opens over the CT and the
segmentation panel lists the SEG's segment labels, as the file names them. Nothing is fetched
from anywhere but the service.

The last screenshot is kept under test-artifacts/ (or $KAAPANA_TEST_ARTIFACTS); with
KAAPANA_UPDATE_SCREENSHOTS=1 it also replaces docs/images/viewer.png (the README's)."""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from bench.dicomweb_server import DicomwebServer
from kaapana_assets.archive.service import Archive
from kaapana_assets.dicomweb.config import DICOMWEB_ROOT
from kaapana_assets.dicomweb.links import SegView, viewer_url
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.synthetic import GeneratedStudy, generate_site
from tests.helpers import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, REPO

VIEWER_DIST = REPO / "build" / "ohif" / "dist"  # `make viewer`
SCREENSHOT = REPO / "docs" / "images" / "viewer.png"
# Large enough for OHIF to show a real image (its thumbnails and volume need a few slices).
GRID = {"slices": 24, "matrix": 128}

pytestmark = [pytest.mark.slow,  # slow tier: a service, a browser and OHIF's 200 MB of scripts
              pytest.mark.tools("chromium")]


@dataclass(frozen=True)
class ViewedSite:
    home: KaapanaHome
    study: GeneratedStudy
    segment_labels: list[str]  # as the SEG file names its segments


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> ViewedSite:
    root = tmp_path_factory.mktemp("viewer")
    home = KaapanaHome(root / "home").ensure()
    (study,) = generate_site("site-a", 1, seed=5, out=root / "generated", with_annotations=True, **GRID)  # type: ignore[arg-type]
    assert study.seg_file is not None and study.seg_series_uid is not None
    report = ingest_files(study.files, Archive.for_home(home), remove_sources=False)
    assert report.count("indexed") == len(study.files)
    seg = pydicom.dcmread(study.seg_file, stop_before_pixels=True)
    return ViewedSite(home, study, [str(item.SegmentLabel) for item in seg.SegmentSequence])


@pytest.fixture(scope="module")
def service(site: ViewedSite) -> Iterator[str]:
    """`kaapana dicomweb --viewer` as a process of its own (stopped by its process group); the
    URL of the viewer (the service's root)."""
    if not (VIEWER_DIST / "index.html").is_file():
        pytest.fail(f"OHIF's build is not in {VIEWER_DIST}: run `make viewer` (fetched at install time)", pytrace=False)
    server = DicomwebServer(site.home.root, ("--viewer", str(VIEWER_DIST)))
    try:
        yield server.url.removesuffix(DICOMWEB_ROOT)
    finally:
        server.stop()


def _skip_tour(page) -> None:  # type: ignore[no-untyped-def]
    """OHIF's onboarding tour, shown once per browser profile, would cover the viewport."""
    skip = page.get_by_text("Skip all", exact=True)
    try:
        skip.wait_for(timeout=5000)
        skip.click()
    except Exception:  # noqa: BLE001 - no tour in this mode, or already dismissed
        pass


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _not_blank(png: bytes) -> tuple[float, float]:
    """The share of lit pixels and their spread: a rendered CT has both, a blank canvas neither."""
    gray = _pixels(png).mean(axis=2)
    return float((gray > 16).mean()), float(gray.std())


def _coloured(png: bytes) -> float:
    """The share of coloured pixels: the CT is drawn in grey, a segment's overlay in colour."""
    rgb = _pixels(png)
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean())


@pytest.mark.timeout(600)
def test_ohif_lists_the_study_renders_the_ct_and_lists_the_segments(site: ViewedSite, service: str,
                                                                    tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    study = site.study
    assert study.seg_series_uid is not None
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    elsewhere: list[str] = []  # every request to anything but the service
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            tmp_path / "chromium-profile", executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000})
        page = browser.new_page()
        page.on("request", lambda r: None if r.url.startswith((service, "data:", "blob:")) else elsewhere.append(r.url))

        # The study list: OHIF's QIDO-RS search of our index shows the study.
        page.goto(f"{service}/")
        expect(page.get_by_text("CT ABDOMEN WITH CONTRAST").first).to_be_visible(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "viewer-study-list.png"))

        # The study, as the dicom_studies link opens it: the CT renders (the canvas is not blank).
        page.goto(viewer_url(service, study.study_uid))
        canvas = page.locator("canvas.cornerstone-canvas").first
        expect(canvas).to_be_visible(timeout=60_000)
        _skip_tour(page)
        lit, spread = 0.0, 0.0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (lit > 0.05 and spread > 10):
            time.sleep(1.0)
            lit, spread = _not_blank(canvas.screenshot())
        page.screenshot(path=str(ARTIFACTS / "viewer-study.png"))
        assert lit > 0.05 and spread > 10, f"the CT did not render: {lit:.1%} lit pixels, spread {spread:.1f}"

        # The SEG, as the segmentations link opens it: hung over its CT, its segments listed by
        # label in the segmentation panel.
        page.goto(viewer_url(service, study.study_uid, SegView(study.seg_series_uid, study.series_uid)))
        for label in site.segment_labels:
            expect(page.get_by_text(label, exact=True).first).to_be_visible(timeout=90_000)
        canvas = page.locator("canvas.cornerstone-canvas").first
        expect(canvas).to_be_visible(timeout=30_000)
        time.sleep(3.0)  # the labelmap is drawn after the panel lists it
        drawn = canvas.screenshot()
        lit, spread = _not_blank(drawn)
        assert lit > 0.05 and spread > 10, f"the CT under the SEG did not render: {lit:.1%} lit, spread {spread:.1f}"
        assert _coloured(drawn) > 0.001, "no segment is drawn over the CT"
        shot = ARTIFACTS / "viewer-segmentation.png"
        page.screenshot(path=str(shot))
        browser.close()
    if os.environ.get("KAAPANA_UPDATE_SCREENSHOTS"):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    assert elsewhere == [], f"the viewer fetched from elsewhere: {elsewhere[:5]}"
