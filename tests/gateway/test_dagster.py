"""A real Dagster webserver behind the gateway: every role sees the UI, the viewer's mutations
are refused (over HTTP and over the GraphQL websocket), a project manager's launch of their
project's cohort reaches Dagster and is audited, another project's is refused."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import polars as pl
import pytest
import websockets

from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import AUDIT
from tests.dagster_site import SiteWebserver
from tests.helpers import REPO
from tests.oidc import COHORT_A, COHORT_B, LAUNCH, MANAGER_A, PROJECT_A, VIEWER_A, GatewaySite

pytestmark = pytest.mark.slow

LOCATION = REPO / "bench" / "gateway_location.py"


@pytest.fixture(scope="module")
def dagster_behind_gateway(gateway_site: GatewaySite, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The webservers on the ports the gateway sends Dagster's surfaces to (one `--read-only`, on
    the same instance); the location's name."""
    webserver = SiteWebserver(tmp_path_factory.mktemp("dagster"), {}, ("-f", str(LOCATION)), gateway_site.dagster_port)
    read_only: SiteWebserver | None = None
    try:
        webserver.wait_ready(120)
        # Started once the instance's storage exists: two webservers creating it at once race.
        read_only = SiteWebserver(tmp_path_factory.mktemp("dagster-read-only"),
                                  {"DAGSTER_HOME": str(webserver.dagster_home)}, ("--read-only", "-f", str(LOCATION)),
                                  gateway_site.dagster_read_only_port)
        read_only.wait_ready(120)
        names = httpx.post(f"http://{webserver.url}/graphql", json={
            "query": "{ workspaceOrError { ... on Workspace { locationEntries { name } } } }"}).json()
        yield names["data"]["workspaceOrError"]["locationEntries"][0]["name"]
    finally:
        if read_only is not None:
            read_only.stop()
        webserver.stop()


def _launch(location: str, partition: str) -> dict:
    return {"query": LAUNCH, "operationName": "Launch", "variables": {"executionParams": {
        "selector": {"repositoryLocationName": location, "repositoryName": "__repository__", "jobName": "cohort_job"},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]}}}}


def test_roles_over_a_real_dagster_webserver(gateway_site: GatewaySite, dagster_behind_gateway: str) -> None:
    graphql = f"{gateway_site.gateway_url}/graphql"
    # The viewer sees the UI and may query it.
    page = httpx.get(gateway_site.gateway_url + "/", headers={**gateway_site.bearer(VIEWER_A), "Accept": "text/html"})
    assert page.status_code == 200 and "Dagster" in page.text
    runs = httpx.post(graphql, json={"query": "{ runsOrError { ... on Runs { results { runId } } } }"},
                      headers=gateway_site.bearer(VIEWER_A))
    assert runs.status_code == 200 and "results" in runs.text
    refused = httpx.post(graphql, json=_launch(dagster_behind_gateway, COHORT_A), headers=gateway_site.bearer(VIEWER_A))
    assert refused.status_code == 403
    # The viewer is served by the read-only webserver (no launch anywhere in its UI), the manager
    # by the one that launches; both see the same instance.
    permissions = "{ permissions { permission value } }"

    def may_launch(user: str) -> bool:
        answer = httpx.post(graphql, json={"query": permissions}, headers=gateway_site.bearer(user)).json()
        return {p["permission"]: p["value"] for p in answer["data"]["permissions"]}["launch_pipeline_execution"]

    assert not may_launch(VIEWER_A) and may_launch(MANAGER_A)
    # The project manager of A launches a run of cohort A, not one of cohort B.
    launched = httpx.post(graphql, json=_launch(dagster_behind_gateway, COHORT_A), headers=gateway_site.bearer(MANAGER_A),
                          timeout=60)
    assert launched.json()["data"]["launchRun"]["__typename"] == "LaunchRunSuccess", launched.text
    assert httpx.post(graphql, json=_launch(dagster_behind_gateway, COHORT_B),
                      headers=gateway_site.bearer(MANAGER_A)).status_code == 403
    # The launch is one row of the audit table, with its project.
    lake = Lake(Path(gateway_site.home) / "lake")
    deadline = time.monotonic() + 10
    rows = pl.DataFrame()
    while time.monotonic() < deadline:
        rows = lake.read(AUDIT, where=(pl.col("user") == MANAGER_A) & (pl.col("action") == "run-launch"))
        if rows.height:
            break
        time.sleep(0.2)
    assert rows.select("project", "target", "via").rows() == [(PROJECT_A, f"cohort_job:{COHORT_A}", "gateway")]
    run_id = launched.json()["data"]["launchRun"]["run"]["runId"]
    seen = httpx.post(graphql, json={"query": "{ runsOrError { ... on Runs { results { runId } } } }"},
                      headers=gateway_site.bearer(VIEWER_A)).json()
    assert run_id in [r["runId"] for r in seen["data"]["runsOrError"]["results"]]


def test_the_graphql_websocket_passes_subscriptions_and_refuses_a_viewers_mutation(
        gateway_site: GatewaySite, dagster_behind_gateway: str) -> None:
    url = gateway_site.gateway_url.replace("http", "ws", 1) + "/graphql"

    async def session(user: str, operation: dict) -> tuple[list[dict], int | None]:
        async with websockets.connect(url, subprotocols=["graphql-ws"],  # type: ignore[list-item]
                                      additional_headers=gateway_site.bearer(user)) as socket:
            await socket.send(json.dumps({"type": "connection_init", "payload": {}}))
            messages = [json.loads(await socket.recv())]
            await socket.send(json.dumps({"id": "1", "type": "start", "payload": operation}))
            try:
                messages.append(json.loads(await asyncio.wait_for(socket.recv(), 2)))
            except TimeoutError:  # a subscription with nothing to say yet: still open
                return messages, None
            except websockets.ConnectionClosed as closed:
                return messages, closed.rcvd.code if closed.rcvd else None
            return messages, None

    subscription = {"query": "subscription { locationStateChangeEvents { event { message } } }"}
    messages, closed = asyncio.run(session(VIEWER_A, subscription))
    assert messages[0]["type"] == "connection_ack" and closed is None
    _, closed = asyncio.run(session(VIEWER_A, _launch(dagster_behind_gateway, COHORT_A)))
    assert closed == 4403


@pytest.mark.tools("chromium")
@pytest.mark.timeout(120)
def test_the_login_in_a_browser_reaches_the_dagster_ui_and_the_viewer(
        gateway_site: GatewaySite, dagster_behind_gateway: str, tmp_path: Path) -> None:
    """Headless Chromium: the gateway sends it to the provider's login page, the login brings it
    back to the Dagster UI; the viewer's origin takes the same session and OHIF's study list shows
    project A's study, not project B's."""
    from playwright.sync_api import expect, sync_playwright

    from kaapana_assets.lake.schemas import STUDIES
    from tests.helpers import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
    from tests.oidc import SCIENTIST_A

    if not (REPO / "build" / "ohif" / "dist" / "index.html").is_file():
        pytest.fail("OHIF's build is not in build/ohif/dist: run `make viewer` (fetched at install time)", pytrace=False)
    studies = Lake(Path(gateway_site.home) / "lake").read(STUDIES)
    accession = {row["study_uid"]: row["accession_number"] for row in studies.iter_rows(named=True)}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(gateway_site.gateway_url + "/runs")
        assert page.url.startswith(gateway_site.provider.issuer)  # the provider's login page
        page.fill("input[name=login]", SCIENTIST_A)
        page.fill("input[name=password]", "any")
        page.click("button[type=submit]")
        page.wait_for_url(gateway_site.gateway_url + "/runs")
        expect(page.get_by_text("Runs").first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "gateway-dagster.png"))

        page.goto(gateway_site.viewer_url + "/")
        expect(page.get_by_role("cell", name=accession[gateway_site.study_a])).to_be_visible(timeout=30_000)
        expect(page.get_by_role("cell", name=accession[gateway_site.study_b])).to_have_count(0)
        page.screenshot(path=str(ARTIFACTS / "gateway-viewer.png"))
        browser.close()
