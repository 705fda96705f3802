"""The Dagster UI in a real browser: Playwright drives Debian's chromium, headless, on
loopback only (no browser download, background networking off). The webserver runs on a
small demo home; the test opens the asset graph, checks groups and assets render,
materializes an asset from the UI and waits for the run to succeed. Screenshots are kept
under test-artifacts/ (or $KAAPANA_TEST_ARTIFACTS)."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import pytest

from kaapana_assets.archive.service import Archive
from kaapana_assets.cohorts.definitions import EXAMPLES, load_definition
from kaapana_assets.cohorts.membership import snapshot_cohort
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.lake import Lake
from tests.dagster_site import SiteWebserver
from tests.helpers import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

GROUPS = ("ingest", "cohorts", "training", "segmentation", "federated", "federated_site", "extensions")

pytestmark = [pytest.mark.slow,  # slow tier: a webserver and a browser
              pytest.mark.tools("chromium")]


@pytest.fixture
def ui_server(tmp_path: Path, corpus: dict):  # type: ignore[no-untyped-def]
    home = KaapanaHome(tmp_path / "home").ensure()
    ingest_files([f for s in corpus["site-a"] for f in s.files], Archive.for_home(home), remove_sources=False)
    snapshot_cohort(Lake(home.lake), load_definition(EXAMPLES / "abdomen-ct-all.yaml"))
    server = SiteWebserver(tmp_path / "ui", {"KAAPANA_HOME": str(home.root), "KAAPANA_SITE": "site-a"})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _dismiss_welcome(page) -> None:  # type: ignore[no-untyped-def]
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(timeout=5000)
        skip.click()
    except Exception:  # noqa: BLE001 - the community dialog shows only once per browser
        pass


@pytest.mark.timeout(300)
def test_asset_graph_and_materialize_from_the_ui(ui_server: SiteWebserver) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    base = f"http://{ui_server.url}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{base}/asset-groups")
        _dismiss_welcome(page)
        for group in GROUPS:
            expect(page.get_by_text(group, exact=True).first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "asset-graph.png"))

        page.goto(f"{base}/locations/definitions/asset-groups/federated")
        for asset in ("federated_plan", "federated_rounds", "federated_model"):
            expect(page.get_by_text(asset, exact=True).first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "federated-group.png"))
        page.goto(f"{base}/locations/definitions/asset-groups/ingest")
        for asset in ("dicom_studies", "quarantine"):
            expect(page.get_by_text(asset, exact=True).first).to_be_visible(timeout=30_000)

        # Materialize site_statistics from its asset page and wait for the run to succeed.
        page.goto(f"{base}/assets/site_statistics")
        expect(page.get_by_text("Never materialized")).to_be_visible(timeout=30_000)
        page.locator("button", has_text="Materialize").first.click()
        # Upstream assets were filled outside Dagster (ingested directly): the UI asks first.
        confirm = page.get_by_role("button", name="Confirm")
        try:
            confirm.wait_for(timeout=10_000)
            confirm.click()
        except Exception:  # noqa: BLE001 - no dialog when upstreams are materialized
            pass
        instance = dg.DagsterInstance.from_config(str(ui_server.dagster_home))
        try:
            deadline = time.monotonic() + 180
            status = None
            while time.monotonic() < deadline:
                runs = instance.get_runs(limit=1)
                status = runs[0].status if runs else None
                if status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE):
                    break
                time.sleep(1.0)
            assert status == dg.DagsterRunStatus.SUCCESS, f"run ended {status}"
        finally:
            instance.dispose()
        page.reload()
        expect(page.get_by_text("Never materialized")).to_have_count(0, timeout=30_000)
        expect(page.get_by_text("openmetrics_file").first).to_be_visible(timeout=30_000)  # its metadata renders
        # The statistics metadata is a table: its records render as cells, one metric per row.
        expect(page.get_by_role("cell", name="kaapana_dicom_studies_total", exact=True).first).to_be_visible(
            timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "site-statistics.png"), full_page=True)
        browser.close()
