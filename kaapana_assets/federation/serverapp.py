"""The hub's Flower ServerApp: one Flower run performs exactly one step, the step its asset
materializes, by the hub handler registered for the step's name (registry.py; e.g. `plan`
and `round` of federated training, `statistics` of the network monitor). The SuperLink
starts it; it talks to the sites only through the Grid (the SuperNodes dial out and poll),
and writes its result into the hub's own federation folder, where the asset that started
the run reads it. kaapana_assets/flower_apps.py makes the app, with the steps registered.

Run config (set by runs.py): step, experiment, round, federation-dir, federation-file,
token (names the result file), timeout (seconds a phase waits for replies), ttl.
"""

from __future__ import annotations

import base64
import json
import os
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from kaapana_assets.federation import channel
from kaapana_assets.federation.channel import (
    CONFIG,
    IDENTITY_EXPERIMENT,
    METRICS,
    Kind,
    Rejection,
    RejectionReason,
    UpdateRejected,
    Verified,
    content_bytes,
    message_type,
    metrics_of,
    seal,
    verify,
)
from kaapana_assets.federation.registry import hub_step
from kaapana_assets.federation.sites import load_site_keys
from kaapana_assets.federation.store import FederationStore
from kaapana_assets.files import write_atomically

POLL_S = 0.5  # how often replies are pulled (Flower's own send_and_receive sleeps 3 s)


@dataclass(frozen=True)
class StepSettings:
    step: str
    experiment: str
    round: int
    folder: Path
    federation_file: Path
    token: str
    timeout_s: float
    ttl_s: float

    @classmethod
    def from_run_config(cls, config: Mapping[str, object]) -> StepSettings:
        return cls(step=str(config["step"]), experiment=str(config["experiment"]), round=int(config["round"]),  # type: ignore[call-overload]
                   folder=Path(str(config["federation-dir"])), federation_file=Path(str(config["federation-file"])),
                   token=str(config["token"]), timeout_s=float(config["timeout"]), ttl_s=float(config["ttl"]))  # type: ignore[arg-type]


class GridChannel:
    """The hub's side of Flower's channel: which node is which site, and one
    send → wait → verify exchange per phase. Every reply is kept in the hub's folder."""

    def __init__(self, grid: Grid, store: FederationStore, experiment: str, keys: Mapping[str, str],
                 timeout_s: float, ttl_s: float, log: Callable[[str], None]):
        self.grid, self.store, self.experiment, self.keys = grid, store, experiment, keys
        self.timeout_s, self.ttl_s, self.log = timeout_s, ttl_s, log

    # -- which node is which site ---------------------------------------------------------------
    def _known(self) -> dict[int, str]:
        path = self.store.root / "nodes.json"
        return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}

    def nodes(self) -> dict[str, int]:
        """Connected sites → node ids. A node not seen before proves which site it is: it
        signs the hub's random challenge with the key of the site it claims to be."""
        known = self._known()
        connected = set(self.grid.get_node_ids())
        unknown = sorted(connected - set(known))
        if unknown:
            challenges = {node: base64.b64encode(os.urandom(16)).decode() for node in unknown}
            messages = [Message(RecordDict({CONFIG: ConfigRecord({"challenge": challenges[node]})}), node, "query",
                                ttl=self.ttl_s, group_id="identify") for node in unknown]
            for node, reply in zip(unknown, self._send(messages), strict=True):
                if reply is None or reply.has_error():
                    self.log(f"node {node} did not identify itself: {reply.error.reason if reply else 'no reply'}")
                    continue
                try:
                    manifest, _ = channel.read_manifest(reply.content)
                    if manifest.site not in self.keys:
                        raise UpdateRejected(RejectionReason.WRONG_SITE, f"claims to be {manifest.site!r}, not a site "
                                             "of this federation")
                    verify(reply.content, self.keys[manifest.site], Kind.IDENTITY, IDENTITY_EXPERIMENT, 0, manifest.site)
                    if manifest.nonce != challenges[node]:
                        raise UpdateRejected(RejectionReason.REPLAYED, "answered another challenge")
                except UpdateRejected as exc:
                    self.log(f"node {node} is not recognised ({exc.reason}): {exc.message}")
                    continue
                known = {n: s for n, s in known.items() if s != manifest.site} | {node: manifest.site}
                self.log(f"node {node} is site {manifest.site}")
            write_atomically(self.store.root / "nodes.json", json.dumps({str(k): v for k, v in known.items()}).encode())
        return {site: node for node, site in known.items() if node in connected}

    # -- one phase ------------------------------------------------------------------------------
    def _send(self, messages: list[Message]) -> list[Message | None]:
        """Push, then pull until every message has its reply or the timeout passes."""
        if not messages:
            return []
        ids = list(self.grid.push_messages(messages))
        pending, replies = {i for i in ids if i}, {}
        deadline = time.monotonic() + self.timeout_s
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                replies[reply.metadata.reply_to_message_id] = reply
                pending.discard(reply.metadata.reply_to_message_id)
            if pending:
                time.sleep(POLL_S)
        return [replies.get(i) for i in ids]

    def exchange(self, kind: Kind, reply_kind: Kind, sites: list[str], round_: int,
                 content: Callable[[str], RecordDict], cases: Callable[[str], int] = lambda site: 0,
                 ) -> tuple[list[Verified], list[Rejection]]:
        node_of = self.nodes()
        rejected, targets = [], []
        for site in sites:
            if site not in node_of:
                rejected.append(Rejection(site, RejectionReason.SITE_FAILED,
                                          "not connected: the site's SuperNode is not polling the SuperLink"))
                continue
            record = seal(content(site), kind, self.experiment, round_, site, cases(site), self.keys[site])
            targets.append((site, Message(record, node_of[site], message_type(kind), ttl=self.ttl_s,
                                          group_id=f"{self.experiment}|{round_}")))
        verified = []
        for (site, _), reply in zip(targets, self._send([m for _, m in targets]), strict=True):
            if reply is None:
                rejected.append(Rejection(site, RejectionReason.SITE_FAILED, f"no reply within {self.timeout_s:.0f} s"))
                continue
            if reply.has_error():
                rejected.append(Rejection(site, RejectionReason.SITE_FAILED, f"site reported: {reply.error.reason}"))
                continue
            self.store.write_message(self.experiment, round_, str(reply_kind), site, content_bytes(reply.content),
                                     box="received")
            try:
                manifest = verify(reply.content, self.keys[site], reply_kind, self.experiment, round_, site)
                n, metrics = metrics_of(reply.content) if METRICS in reply.content else (manifest.cases, {})
                if n != manifest.cases:
                    raise UpdateRejected(RejectionReason.BAD_PAYLOAD, "case count disagrees with the manifest")
            except UpdateRejected as exc:
                rejected.append(Rejection(site, exc.reason, exc.message))
                continue
            except (KeyError, TypeError, ValueError) as exc:
                rejected.append(Rejection(site, RejectionReason.BAD_PAYLOAD, f"unreadable reply: {exc}"))
                continue
            verified.append(Verified(site, manifest.cases, metrics, manifest.sha256, reply))
        return verified, rejected


@dataclass(frozen=True)
class HubRun:
    """What a step's hub handler gets: the run's settings, the Grid, the hub's folder, the
    sites' keys and the run's log."""

    settings: StepSettings
    grid: Grid
    store: FederationStore
    keys: Mapping[str, str]
    log: Callable[[str], None]

    @property
    def sites(self) -> list[str]:
        return sorted(self.keys)

    def channel(self, timeout_s: float | None = None, ttl_s: float | None = None) -> GridChannel:
        """The Grid as GridChannel, with the run's timeout and TTL unless given shorter ones."""
        return GridChannel(self.grid, self.store, self.settings.experiment, self.keys,
                           self.settings.timeout_s if timeout_s is None else timeout_s,
                           self.settings.ttl_s if ttl_s is None else ttl_s, self.log)


def run_hub_step(grid: Grid, context: Context) -> None:
    """The ServerApp's main: the registered step's hub handler; its result, or the error,
    goes to the result file the asset waits for."""
    settings = StepSettings.from_run_config(context.run_config)
    store = FederationStore(settings.folder)
    result_path = store.result_path(settings.experiment, settings.token)

    def log(line: str) -> None:
        print(f"[kaapana hub] {line}", flush=True)  # streamed to the asset's log by `flwr run --stream`

    step = hub_step(settings.step)
    try:
        keys = load_site_keys(settings.federation_file)
        if step is None:
            result = {"ok": False, "error": f"unknown step {settings.step!r}", "kind": "refused"}
        else:
            result = step.hub(HubRun(settings, grid, store, keys, log))
    except Exception as exc:  # noqa: BLE001 - reported to the asset, which fails with it
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "kind": "error",
                  "traceback": traceback.format_exc()[-4000:]}
    write_atomically(result_path, json.dumps(result, default=str).encode())
    log(f"{settings.step} of {settings.experiment}" + (f" round {settings.round}" if step and step.numbered else "")
        + (": done" if result.get("ok") else f": FAILED: {result.get('error')}"))


def server_app() -> ServerApp:
    """The hub's ServerApp (made once, by kaapana_assets/flower_apps.py)."""
    app = ServerApp()
    app.main()(run_hub_step)
    return app


__all__ = ["GridChannel", "HubRun", "StepSettings", "run_hub_step", "server_app"]
