"""The federation's transport and the steps it carries: federated training (`plan`, `round`)
and the network monitor (`statistics`) register their steps; the ServerApp and the ClientApp
find them in the registry; the transport imports neither domain, the domains not each
other, and production code not the local federation."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from kaapana_assets import flower_apps
from kaapana_assets.federated import steps as training
from kaapana_assets.federated.step_names import EVALUATION_STEP, PLAN_STEP, ROUND_STEP
from kaapana_assets.federation import registry
from kaapana_assets.federation.channel import CONFIG, IDENTITY_EXPERIMENT, Kind, seal, verify
from kaapana_assets.federation.clientapp import answer
from kaapana_assets.federation.keys import generate_site_key
from kaapana_assets.federation.serverapp import run_hub_step
from kaapana_assets.federation.sites import SiteEntry, write_sites
from kaapana_assets.federation.store import FederationStore
from kaapana_assets.monitoring import steps as monitoring
from kaapana_assets.monitoring.figures import EXPERIMENT as STATISTICS
from kaapana_assets.monitoring.figures import STEP as STATISTICS_STEP
from tests.helpers import REPO, make_site_lake

PACKAGE = REPO / "kaapana_assets"


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (at any depth of the file), absolute names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def _importing(folder: Path, prefixes: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(REPO)}: {name}" for path in sorted(folder.rglob("*.py"))
            for name in sorted(_imports(path)) if name.startswith(prefixes)]


def test_the_transport_imports_no_domain_and_the_domains_not_each_other() -> None:
    assert _importing(PACKAGE / "federation", ("kaapana_assets.federated", "kaapana_assets.monitoring",
                                               "kaapana_assets.flower_apps")) == []
    assert _importing(PACKAGE / "federated", ("kaapana_assets.monitoring",)) == []
    assert _importing(PACKAGE / "monitoring", ("kaapana_assets.federated",)) == []


def test_production_code_never_imports_the_local_federation() -> None:
    """local.py is the demo's and the tests' (and the CLI's, which prints its commands)."""
    allowed = ("kaapana_assets/demo", "kaapana_assets/cli/", "kaapana_assets/federation/local.py")
    paths = [*PACKAGE.rglob("*.py"), *(REPO / "resources").glob("*.py"), *(REPO / "sensors").glob("*.py"),
             REPO / "definitions.py"]
    users = [str(p.relative_to(REPO)) for p in paths if "kaapana_assets.federation.local" in _imports(p)]
    assert [u for u in users if not u.startswith(allowed)] == []


def test_the_domains_register_their_steps() -> None:
    assert {PLAN_STEP, ROUND_STEP, STATISTICS_STEP} <= set(registry.steps())
    assert flower_apps.STEP_MODULES == (training, monitoring)
    assert registry.hub_step(PLAN_STEP) is training.PLAN and registry.hub_step(ROUND_STEP) is training.ROUND
    assert registry.hub_step(STATISTICS_STEP) is monitoring.STATISTICS
    assert registry.hub_step(ROUND_STEP).numbered and not registry.hub_step(STATISTICS_STEP).numbered  # type: ignore[union-attr]
    assert registry.site_handler(Kind.FINGERPRINT_REQUEST) is training.fingerprint
    assert (registry.site_handler(Kind.TRAIN), registry.site_handler(Kind.EVALUATE)) == (training.train,
                                                                                          training.evaluate)
    assert registry.site_handler(Kind.STATISTICS_REQUEST) is monitoring.statistics
    assert registry.hub_step(EVALUATION_STEP) is training.EVALUATION
    assert registry.site_handler(Kind.MODEL_EVALUATION_REQUEST) is training.model_evaluation
    assert registry.site_handler(Kind.UPDATE) is None and registry.site_handler("no-such-kind") is None
    assert "nnunetv2.training.nnUNetTrainer.nnUNetTrainer" in registry.site_preloads()

    assert registry.register_step(training.PLAN) is training.PLAN  # the same step again: nothing changes
    with pytest.raises(ValueError, match="already registered"):
        registry.register_step(registry.Step(PLAN_STEP, hub=monitoring.statistics_step))
    with pytest.raises(ValueError, match="already answered"):
        registry.register_step(registry.Step("other", hub=monitoring.statistics_step,
                                             site={Kind.TRAIN: monitoring.statistics}))
    with pytest.raises(ValueError, match="the transport does"):
        registry.register_step(registry.Step("other", hub=monitoring.statistics_step,
                                             site={Kind.IDENTIFY: monitoring.statistics}))
    assert "other" not in registry.steps()


def test_the_clientapp_answers_by_the_registered_kind(tmp_path: Path, flower_run: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAAPANA_SITE_KEY", raising=False)
    key = generate_site_key()
    (tmp_path / "site.key").write_text(key)
    make_site_lake(tmp_path / "home" / "lake")
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={}, node_config={
        "kaapana-home": str(tmp_path / "home"), "site": "site-x", "key-file": str(tmp_path / "site.key")})

    def request(kind: Kind, message_type: str) -> Message:
        content = RecordDict({CONFIG: ConfigRecord({"request": json.dumps({"threshold": 5})})})
        return Message(seal(content, kind, STATISTICS, 42, "site-x", 0, key), 1, message_type)

    reply = answer(request(Kind.STATISTICS_REQUEST, "query"), context)  # monitoring's site handler
    verify(reply.content, key, Kind.STATISTICS, STATISTICS, 42, "site-x")
    with pytest.raises(RuntimeError, match="refuses a statistics_request request sent as a train message"):
        answer(request(Kind.STATISTICS_REQUEST, "train"), context)
    with pytest.raises(RuntimeError, match="answers no 'update' request"):
        answer(request(Kind.UPDATE, "query"), context)

    challenge = Message(RecordDict({CONFIG: ConfigRecord({"challenge": "bm9uY2U="})}), 1, "query")
    identity = answer(challenge, context)  # the transport's own: which site this is
    assert verify(identity.content, key, Kind.IDENTITY, IDENTITY_EXPERIMENT, 0, "site-x").nonce == "bm9uY2U="


def test_the_serverapp_refuses_a_step_nobody_registered(tmp_path: Path) -> None:
    federation_file = write_sites(tmp_path / "federation.yaml", [SiteEntry("site-x", key=generate_site_key())])
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={
        "step": "no-such-step", "experiment": "exp", "round": 0, "federation-dir": str(tmp_path / "hub"),
        "federation-file": str(federation_file), "token": "t1", "timeout": 1.0, "ttl": 1.0})
    run_hub_step(None, context)  # type: ignore[arg-type]  # never reaches the Grid
    result = json.loads(FederationStore(tmp_path / "hub").result_path("exp", "t1").read_text())
    assert result == {"ok": False, "error": "unknown step 'no-such-step'", "kind": "refused"}
