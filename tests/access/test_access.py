"""Identities from claims, the signed identity header, scopes, and the audit trail's batched
appends on a real lake."""

from __future__ import annotations

import datetime as dt
import time

import dagster as dg
import pyarrow as pa
import pytest

from kaapana_assets.access.assets import audit_trail
from kaapana_assets.access.audit import Action, AuditEvent, AuditLog, Via, audit_figures
from kaapana_assets.access.identity import ClaimNames, Identity, IdentityError, Role, read_header, sign_header
from kaapana_assets.access.scopes import ScopeCache
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import AUDIT, SERIES_PROJECTS
from resources.storage import LakeResource

SECRET = b"a shared secret of the gateway and its services"
SCIENTIST = Identity("sam", frozenset({Role.SCIENTIST}), frozenset({"proj-a"}))


def test_roles_and_projects_from_keycloak_or_flat_claims() -> None:
    keycloak = {"sub": "f00", "preferred_username": "sam", "projects": ["Proj-A"],
                "realm_access": {"roles": ["scientist", "offline_access", "uma_authorization"]}}
    assert Identity.from_claims(keycloak) == SCIENTIST
    flat = {"sub": "sam", "roles": ["project-manager"], "groups": ["proj-b"]}
    assert Identity.from_claims(flat, ClaimNames(projects=("groups",))) == Identity(
        "sam", frozenset({Role.PROJECT_MANAGER}), frozenset({"proj-b"}))
    with pytest.raises(IdentityError, match="not a list of strings"):
        Identity.from_claims({"sub": "x", "roles": {"admin": True}})
    with pytest.raises(IdentityError, match="names no user"):
        Identity.from_claims({"roles": ["admin"]})


def test_what_each_role_may_launch() -> None:
    manager = Identity("pia", frozenset({Role.PROJECT_MANAGER}), frozenset({"proj-a"}))
    viewer = Identity("vic", frozenset({Role.VIEWER}), frozenset({"proj-a"}))
    admin = Identity("ada", frozenset({Role.ADMIN}), frozenset())
    assert manager.may_launch_for("proj-a", evaluation=False) and not manager.may_launch_for("proj-b", evaluation=False)
    assert SCIENTIST.may_launch_for("proj-a", evaluation=True) and not SCIENTIST.may_launch_for("proj-a", evaluation=False)
    assert not viewer.may_launch and not viewer.may_launch_for("proj-a", evaluation=True)
    assert admin.may_launch_for(None, evaluation=False) and not manager.may_launch_for(None, evaluation=False)


def test_the_identity_header_is_refused_when_tampered_with_or_old() -> None:
    header = sign_header(SCIENTIST, SECRET)
    assert read_header(header, SECRET) == SCIENTIST
    payload, mac = header.split(".")
    admin = sign_header(Identity("sam", frozenset({Role.ADMIN}), frozenset()), b"another secret").split(".")[0]
    for forged in (f"{admin}.{mac}", header + "0", "garbage", f"{payload}."):
        with pytest.raises(IdentityError):
            read_header(forged, SECRET)
    with pytest.raises(IdentityError, match="expired"):
        read_header(sign_header(SCIENTIST, SECRET, now=time.time() - 3600), SECRET)


def _assign(lake: Lake, rows: list[tuple[str, str, str]]) -> None:
    lake.merge(SERIES_PROJECTS, pa.Table.from_pylist([
        {"series_uid": series, "study_uid": study, "project": project, "assigned_by": "operator",
         "assigned_at": dt.datetime.now(dt.UTC)} for series, study, project in rows], schema=SERIES_PROJECTS.schema))


def test_the_scope_follows_new_assignments(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lake = Lake(tmp_path / "lake")
    scopes = ScopeCache(lake, recheck_s=0.0)
    assert scopes.scope(SCIENTIST).series_uids == frozenset()
    _assign(lake, [("1.2.1", "1.2", "proj-a"), ("1.3.1", "1.3", "proj-b")])
    assert (scopes.scope(SCIENTIST).series_uids, scopes.scope(SCIENTIST).study_uids) == ({"1.2.1"}, {"1.2"})
    _assign(lake, [("1.3.1", "1.3", "proj-a")])  # shared with A
    assert scopes.scope(SCIENTIST).allows_series("1.3.1")
    assert scopes.scope(Identity("ada", frozenset({Role.ADMIN}), frozenset())).everything


def test_audit_events_are_appended_in_batches_and_the_rest_on_close(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lake = Lake(tmp_path / "lake")
    log = AuditLog(lake, flush_s=0.5, batch=10)
    with log.running():
        for i in range(25):
            log.record(AuditEvent(SCIENTIST, Action.RETRIEVE, Via.DICOMWEB, "1.2", f"1.2.{i}"))
        assert log.wait_flushed(10)
        # 25 events: two full batches of 10 and the rest when the half second passed.
        assert lake.version(AUDIT) == 3
        log.record(AuditEvent(SCIENTIST, Action.CLIENT_READ, Via.CLIENT, "1.2", "1.2.99"))
    rows = lake.read(AUDIT)
    assert rows.height == 26 and rows["event_id"].n_unique() == 26
    figures = audit_figures(lake)
    assert (figures.rows, figures.window_users) == (26, 1)
    assert [(f["action"], f["accesses"]) for f in figures.by_user_action] == [("retrieve", 25), ("client-read", 1)]
    result = dg.materialize([audit_trail], resources={"lake": LakeResource(uri=str(tmp_path / "lake"))})
    metadata = result.asset_materializations_for_node("audit_trail")[0].metadata
    assert metadata["rows"].value == 26 and metadata["accesses_24h"].value == 26
