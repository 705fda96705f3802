"""The gateway in front of the DICOMweb service, against a real OpenID Connect provider
(oidc-provider under Node) with two projects and four users: who gets in, what each sees, what
each may launch, and the audit trail of it."""

from __future__ import annotations

import base64
import json
import time
import uuid

import httpx
import polars as pl
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from dicomweb_client import DICOMwebClient
from joserfc import jwt
from joserfc.jwk import RSAKey

from kaapana_assets.access.identity import IDENTITY_HEADER, Identity, Role, sign_header
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import AUDIT
from tests.oidc import (
    ADMIN,
    COHORT_A,
    COHORT_B,
    LAUNCH,
    MANAGER_A,
    PROJECT_A,
    SCIENTIST_A,
    SHORT_CLIENT_ID,
    VIEWER_A,
    GatewaySite,
    log_in,
)

STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
SURFACES = ("/", "/graphql", "/runs", "/dicom-web/studies", "/mlflow/", "/metrics")


def _launch(partition: str) -> dict:
    return {"query": LAUNCH, "variables": {"executionParams": {
        "selector": {"repositoryLocationName": "gateway_site", "repositoryName": "__repository__",
                     "jobName": "cohort_job"},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]}}}}


def _dicomweb(site: GatewaySite, user: str) -> DICOMwebClient:
    return DICOMwebClient(f"{site.gateway_url}/dicom-web", headers=site.bearer(user))


def test_without_an_identity_every_surface_answers_401_or_sends_the_browser_to_the_login(
        gateway_site: GatewaySite) -> None:
    for path in SURFACES:
        api = httpx.get(gateway_site.gateway_url + path, headers={"Accept": "application/json"})
        assert api.status_code == 401, (path, api.text)
        assert api.headers["www-authenticate"].startswith("Bearer")
        browser = httpx.get(gateway_site.gateway_url + path, headers={"Accept": "text/html"})
        assert browser.status_code == 302, path
        assert browser.headers["location"].startswith("/auth/login?next=")
    assert httpx.post(gateway_site.gateway_url + "/graphql", json={"query": "{ version }"}).status_code == 401
    assert httpx.get(gateway_site.viewer_url + "/", headers={"Accept": "text/html"}).status_code == 302
    # The service itself answers only requests the gateway signed, whoever reaches its port.
    assert httpx.get(f"{gateway_site.dicomweb_url}/studies").status_code == 401
    forged = sign_header(Identity("mallory", frozenset({Role.ADMIN}), frozenset()), b"not the gateway's secret")
    assert httpx.get(f"{gateway_site.dicomweb_url}/studies", headers={IDENTITY_HEADER: forged}).status_code == 401


def test_a_forged_an_expired_or_a_foreign_token_is_refused(gateway_site: GatewaySite) -> None:
    genuine = gateway_site.tokens(SCIENTIST_A).access_token
    header, claims = (json.loads(base64.urlsafe_b64decode(part + "==")) for part in genuine.split(".")[:2])
    # The same claims and key id, signed with a key that is not the provider's.
    forged = jwt.encode({"alg": "RS256", "kid": header["kid"]}, claims,
                        RSAKey.import_key(rsa.generate_private_key(65537, 2048)))
    # Unsigned ("alg": "none") with every claim an admin would carry.
    unsigned = ".".join(base64.urlsafe_b64encode(json.dumps(p).encode()).decode().rstrip("=")
                        for p in ({"alg": "none", "typ": "JWT"}, claims | {"realm_access": {"roles": ["admin"]}})) + "."
    id_token = gateway_site.tokens(SCIENTIST_A).id_token  # signed by the provider, but for the client, not the gateway
    expiring = gateway_site.tokens(SCIENTIST_A, SHORT_CLIENT_ID).access_token
    url = f"{gateway_site.gateway_url}/dicom-web/studies"
    assert httpx.get(url, headers={"Authorization": f"Bearer {genuine}"}).status_code == 200
    time.sleep(2.1)  # past the short client's one-second expiry
    for token, why in ((forged, "BadSignature"), (unsigned, ""), (id_token, "aud"), (expiring, "expired"),
                       ("not-a-token", "")):
        answer = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 401, (why, answer.text)
        assert why.lower() in answer.text.lower(), answer.text


def test_a_scientist_of_a_sees_only_project_a_over_dicomweb(gateway_site: GatewaySite) -> None:
    scientist = _dicomweb(gateway_site, SCIENTIST_A)
    studies = {s[STUDY_UID]["Value"][0] for s in scientist.search_for_studies()}
    assert studies == {gateway_site.study_a}
    assert {s[SERIES_UID]["Value"][0] for s in scientist.search_for_series()} == set(gateway_site.series_a)
    assert scientist.search_for_studies(search_filters={"StudyInstanceUID": gateway_site.study_b}) == []
    with pytest.raises(requests.HTTPError) as absent:
        scientist.search_for_series(gateway_site.study_b)
    assert absent.value.response.status_code == 404
    # What is in project A is served; what is in B answers as if absent (404, not 403).
    assert scientist.retrieve_series_metadata(gateway_site.study_a, gateway_site.series_a[0])
    b_instances = _dicomweb(gateway_site, ADMIN).search_for_instances(gateway_site.study_b, gateway_site.series_b[0])
    b_instance = b_instances[0]["00080018"]["Value"][0]
    for path in (f"/studies/{gateway_site.study_b}", f"/studies/{gateway_site.study_b}/series/{gateway_site.series_b[0]}"
                 f"/instances/{b_instance}", f"/studies/{gateway_site.study_b}/series/{gateway_site.series_b[0]}"
                 f"/instances/{b_instance}/frames/1", f"/studies/{gateway_site.study_b}/metadata",
                 f"/studies/{gateway_site.study_b}/series/{gateway_site.series_b[0]}/rendered"):
        answer = requests.get(f"{gateway_site.gateway_url}/dicom-web{path}", headers=gateway_site.bearer(SCIENTIST_A))
        assert answer.status_code == 404, (path, answer.status_code)
    with pytest.raises(requests.HTTPError) as refused:
        scientist.retrieve_instance(gateway_site.study_b, gateway_site.series_b[0], b_instance)
    assert refused.value.response.status_code == 404
    # An identity header from outside is dropped by the gateway, whoever signed it.
    admin = sign_header(Identity(SCIENTIST_A, frozenset({Role.ADMIN}), frozenset()), gateway_site.identity_secret)
    smuggled = requests.get(f"{gateway_site.gateway_url}/dicom-web/studies",
                            headers={**gateway_site.bearer(SCIENTIST_A), IDENTITY_HEADER: admin})
    assert [s[STUDY_UID]["Value"][0] for s in smuggled.json()] == [gateway_site.study_a]
    # The admin sees both projects.
    admin_studies = {s[STUDY_UID]["Value"][0] for s in _dicomweb(gateway_site, ADMIN).search_for_studies()}
    assert admin_studies == {gateway_site.study_a, gateway_site.study_b}


def test_a_viewer_may_not_send_a_mutation_and_a_manager_launches_only_for_their_project(
        gateway_site: GatewaySite) -> None:
    graphql = f"{gateway_site.gateway_url}/graphql"
    refused = httpx.post(graphql, json=_launch(COHORT_A), headers=gateway_site.bearer(VIEWER_A))
    assert refused.status_code == 403
    assert "viewer-a (viewer) may not change anything" in refused.json()["errors"][0]["message"]
    wipe = {"query": "mutation { wipeAssets(assetPartitionRanges: []) { __typename } }"}
    assert httpx.post(graphql, json=wipe, headers=gateway_site.bearer(MANAGER_A)).status_code == 403
    other = httpx.post(graphql, json=_launch(COHORT_B), headers=gateway_site.bearer(MANAGER_A))
    assert other.status_code == 403
    assert "of project proj-b" in other.json()["errors"][0]["message"]
    # Writes outside GraphQL: Dagster's REST reports are an admin's, STOW-RS needs a role that launches.
    report = httpx.post(f"{gateway_site.gateway_url}/report_asset_materialization/cohort_snapshot",
                        headers=gateway_site.bearer(MANAGER_A))
    assert report.status_code == 403
    stow = httpx.post(f"{gateway_site.gateway_url}/dicom-web/studies", headers=gateway_site.bearer(VIEWER_A))
    assert stow.status_code == 403 and "may read only" in stow.text
    # A scientist launches evaluations only; a cohort job is not one.
    assert httpx.post(graphql, json=_launch(COHORT_A), headers=gateway_site.bearer(SCIENTIST_A)).status_code == 403
    # Over the websocket too: a graphql-ws message carrying a mutation closes it (tests/gateway/test_dagster.py
    # shows the allowed launch reaching a real webserver).
    assert httpx.post(graphql, content=b"{not json", headers=gateway_site.bearer(MANAGER_A)).status_code == 400


def test_every_access_to_patient_data_is_one_row_of_the_audit_table(gateway_site: GatewaySite) -> None:
    lake = Lake(gateway_site.home / "lake")
    marker_series = gateway_site.series_a[0]

    def retrieves() -> int:
        if not lake.exists(AUDIT):
            return 0
        rows = lake.read(AUDIT, where=(pl.col("user") == VIEWER_A) & (pl.col("action") == "retrieve")
                         & (pl.col("series_uid") == marker_series))
        return rows.height

    before = retrieves()
    viewer = _dicomweb(gateway_site, VIEWER_A)
    for _ in range(3):
        viewer.retrieve_series_metadata(gateway_site.study_a, marker_series)
    deadline = time.monotonic() + 10
    while retrieves() < before + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert retrieves() == before + 3
    row = lake.read(AUDIT, where=(pl.col("user") == VIEWER_A) & (pl.col("series_uid") == marker_series)).row(0, named=True)
    assert (row["roles"], row["projects"], row["via"], row["study_uid"]) == (
        ["viewer"], [PROJECT_A], "dicomweb", gateway_site.study_a)


def test_the_browser_login_flow_sets_a_session_that_every_surface_accepts(gateway_site: GatewaySite) -> None:
    with httpx.Client(base_url=gateway_site.gateway_url, headers={"Accept": "text/html"}) as browser:
        first = browser.get("/dicom-web/studies")
        assert first.status_code == 302
        to_provider = browser.get(first.headers["location"])
        assert to_provider.status_code == 302 and to_provider.headers["location"].startswith(gateway_site.provider.issuer)
        callback = log_in(browser, to_provider, SCIENTIST_A, gateway_site.provider.issuer)
        back = browser.get(callback)
        assert back.status_code == 302 and back.headers["location"] == "/dicom-web/studies"
        assert browser.get("/auth/whoami").json() == {"user": SCIENTIST_A, "roles": ["scientist"], "projects": [PROJECT_A]}
        studies = browser.get("/dicom-web/studies", headers={"Accept": "application/dicom+json"})
        assert [s[STUDY_UID]["Value"][0] for s in studies.json()] == [gateway_site.study_a]
        # A session cookie made up without the gateway's secret is no session.
        browser.cookies.set("kaapana_session", base64.b64encode(json.dumps(
            {"identity": {"user": "x", "roles": ["admin"], "projects": []}, "expires_at": 2e9}).encode()).decode()
            + "." + uuid.uuid4().hex)
        assert browser.get("/dicom-web/studies", headers={"Accept": "application/json"}).status_code == 401
