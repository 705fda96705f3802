"""The hub's Flower ServerApp: one Flower run performs exactly one step of an experiment,
the step its asset materializes — `plan` (collect the sites' fingerprints), `round`
(from global r-1 to global r) or `statistics` (the network monitor: every site's
aggregates, small cells suppressed at the site; `round` is then the collection's number).
The SuperLink starts it; it talks to the sites only through the Grid (the SuperNodes dial
out and poll), and writes its result into the hub's own federation folder, where the asset
that started the run reads it.

Run config (set by runs.py): step, experiment, round, federation-dir, federation-file,
token (names the result file), timeout (seconds a phase waits for replies), ttl.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from kaapana_assets.federated import channel
from kaapana_assets.federated.channel import (
    ARRAYS,
    CONFIG,
    IDENTITY_EXPERIMENT,
    METRICS,
    Kind,
    RejectionReason,
    UpdateRejected,
    content_bytes,
    full_arrays,
    metrics_of,
    seal,
    verify,
    weight_records,
)
from kaapana_assets.federated.fingerprint import SiteFingerprint
from kaapana_assets.federated.hub import (
    ExperimentSpec,
    Rejection,
    RoundFailed,
    RoundSuperseded,
    Verified,
    run_round,
)
from kaapana_assets.federated.sites import load_site_keys
from kaapana_assets.federated.store import FederationStore
from kaapana_assets.files import write_atomically
from kaapana_assets.monitoring.figures import AnswerRefused, parse_answer
from kaapana_assets.monitoring.network import read_request

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
            message_type = {Kind.TRAIN: "train", Kind.EVALUATE: "evaluate"}.get(kind, "query")
            targets.append((site, Message(record, node_of[site], message_type, ttl=self.ttl_s,
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


class RoundChannel:
    """hub.SiteChannel over the Grid: what a round sends with the weights."""

    def __init__(self, grid_channel: GridChannel, spec: ExperimentSpec, published: Mapping[str, dict]):
        self.channel, self.spec = grid_channel, spec
        # What every site needs besides the weights, published by federated_plan.
        self.config = {name: json.dumps(value, sort_keys=True) for name, value in published.items()}

    def _content(self, weights: Mapping[str, torch.Tensor]) -> Callable[[str], RecordDict]:
        records = weight_records(weights)
        return lambda site: RecordDict({**records, CONFIG: ConfigRecord(dict(self.config))})

    def train(self, sites: list[str], round_: int,
              weights: Mapping[str, torch.Tensor]) -> tuple[list[Verified], list[Rejection]]:
        verified, rejected = self.channel.exchange(Kind.TRAIN, Kind.UPDATE, sites, round_, self._content(weights))
        accepted = []
        for update in verified:
            assert update.message is not None
            try:
                arrays = full_arrays(update.message.content) if ARRAYS in update.message.content else None
            except ValueError as exc:
                rejected.append(Rejection(update.site, RejectionReason.BAD_PAYLOAD, str(exc)))
                continue
            if arrays is None or set(arrays.keys()) != set(weights):
                rejected.append(Rejection(update.site, RejectionReason.BAD_PAYLOAD,
                                          "the update is not a state dict of the experiment's network"))
                continue
            bad = [k for k in weights if tuple(arrays[k].shape) != tuple(weights[k].shape)]
            if bad:
                rejected.append(Rejection(update.site, RejectionReason.BAD_PAYLOAD, f"tensor {bad[0]} has shape "
                                          f"{tuple(arrays[bad[0]].shape)}, expected {tuple(weights[bad[0]].shape)}"))
                continue
            # Verified already: the strategies now see every name of the state dict.
            update.message.content[ARRAYS] = arrays
            accepted.append(update)
        return accepted, rejected

    def evaluate(self, sites: list[str], round_: int,
                 weights: Mapping[str, torch.Tensor]) -> tuple[list[Verified], list[Rejection]]:
        return self.channel.exchange(Kind.EVALUATE, Kind.EVALUATION, sites, round_, self._content(weights))


def plan_step(settings: StepSettings, grid_channel: GridChannel, store: FederationStore,
              sites: list[str]) -> dict:
    """Every site's fingerprint (aggregates only), verified; planning itself runs in the asset."""
    spec = json.dumps(store.read_json(settings.experiment, "experiment"), sort_keys=True)
    verified, rejected = grid_channel.exchange(
        Kind.FINGERPRINT_REQUEST, Kind.FINGERPRINT, sites, 0,
        lambda site: RecordDict({CONFIG: ConfigRecord({"experiment": spec})}))
    fingerprints = {}
    for reply in verified:
        assert reply.message is not None
        try:
            fingerprint = SiteFingerprint.from_json(str(reply.message.content[CONFIG]["fingerprint"]))
        except (KeyError, ValueError, TypeError) as exc:
            rejected.append(Rejection(reply.site, RejectionReason.BAD_PAYLOAD, f"unreadable fingerprint: {exc}"))
            continue
        if fingerprint.site != reply.site or fingerprint.cases != reply.cases:
            rejected.append(Rejection(reply.site, RejectionReason.BAD_PAYLOAD, "fingerprint disagrees with its manifest"))
            continue
        fingerprints[reply.site] = fingerprint.to_json()
    return {"fingerprints": fingerprints, "rejected": [_rejection(r) for r in rejected]}


def _rejection(r: Rejection) -> dict:
    return {"site": r.site, "reason": str(r.reason), "message": r.message}


def _rows(rows: list[dict]) -> list[dict]:
    return [{k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in row.items()} for row in rows]


def statistics_step(settings: StepSettings, grid: Grid, store: FederationStore, keys: Mapping[str, str],
                    log: Callable[[str], None]) -> dict:
    """Every site's aggregates (the site suppresses small cells; the hub refuses an answer
    with a small count in the clear). A short wait and TTL: a site that does not answer is
    reported stale by the asset, and a request must not wait 24 h for a site to return."""
    request = read_request(store, settings.round)
    threshold = int(request["threshold"])
    timeout_s = min(settings.timeout_s, float(request["timeout_s"]))
    grid_channel = GridChannel(grid, store, settings.experiment, keys, timeout_s, min(settings.ttl_s, timeout_s), log)
    body = json.dumps({"threshold": threshold}, sort_keys=True)
    verified, rejected = grid_channel.exchange(
        Kind.STATISTICS_REQUEST, Kind.STATISTICS, sorted(keys), settings.round,
        lambda site: RecordDict({CONFIG: ConfigRecord({"request": body})}))
    answers = {}
    for reply in verified:
        assert reply.message is not None
        try:
            answer = parse_answer(str(reply.message.content[CONFIG]["statistics"]), reply.site, threshold)
        except (KeyError, AnswerRefused) as exc:
            rejected.append(Rejection(reply.site, RejectionReason.BAD_PAYLOAD, f"statistics refused: {exc}"))
            continue
        answers[reply.site] = answer.to_json()
    for rejection in rejected:
        log(f"statistics of {rejection.site}: {rejection.reason}: {rejection.message}")
    return {"answers": answers, "rejected": [_rejection(r) for r in rejected]}


def round_step(settings: StepSettings, grid_channel: GridChannel, store: FederationStore,
               log: Callable[[str], None]) -> dict:
    experiment = settings.experiment
    spec = ExperimentSpec(**store.read_json(experiment, "experiment"))
    participants = store.read_json(experiment, "participants")["sites"]
    published = {name: store.read_json(experiment, name) for name in ("experiment", "plans", "fingerprint", "dataset")}
    try:
        outcome = run_round(store, spec, settings.round, participants, spec.min_sites,
                            RoundChannel(grid_channel, spec, published), log, log)
    except RoundFailed as exc:
        return {"ok": False, "error": str(exc), "kind": "below_quorum", "rows": _rows(exc.rows)}
    except (FileNotFoundError, RoundSuperseded) as exc:
        return {"ok": False, "error": str(exc), "kind": "refused", "rows": []}
    return {"ok": True, "round": outcome.round, "global_sha256": outcome.global_sha256,
            "aggregated": outcome.aggregated, "rejected": [_rejection(r) for r in outcome.rejected],
            "evaluations": outcome.evaluations, "metrics": outcome.metrics, "rows": _rows(outcome.rows)}


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = StepSettings.from_run_config(context.run_config)
    store = FederationStore(settings.folder)
    result_path = store.result_path(settings.experiment, settings.token)

    def log(line: str) -> None:
        print(f"[kaapana hub] {line}", flush=True)  # streamed to the asset's log by `flwr run --stream`

    try:
        keys = load_site_keys(settings.federation_file)
        grid_channel = GridChannel(grid, store, settings.experiment, keys, settings.timeout_s, settings.ttl_s, log)
        if settings.step == "plan":
            result = {"ok": True, **plan_step(settings, grid_channel, store, sorted(keys))}
        elif settings.step == "round":
            result = round_step(settings, grid_channel, store, log)
        elif settings.step == "statistics":
            result = {"ok": True, **statistics_step(settings, grid, store, keys, log)}
        else:
            result = {"ok": False, "error": f"unknown step {settings.step!r}", "kind": "refused"}
    except Exception as exc:  # noqa: BLE001 - reported to the asset, which fails with it
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "kind": "error",
                  "traceback": traceback.format_exc()[-4000:]}
    write_atomically(result_path, json.dumps(result, default=str).encode())
    log(f"{settings.step} of {settings.experiment}" + (f" round {settings.round}" if settings.step == "round" else "")
        + (": done" if result.get("ok") else f": FAILED: {result.get('error')}"))


__all__ = ["GridChannel", "RoundChannel", "StepSettings", "app"]
