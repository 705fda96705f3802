"""A site's Flower ClientApp: runs in a process the site's SuperNode starts, at the site,
against the site's own KAAPANA_HOME. It is the site's wiring layer (as assets.py is the
hub's): each message from the hub is verified with the site's key, what it carries is put
into the site's own federation folder, and the site's participation is *materialized into
the site's own Dagster instance* (site_fingerprint, site_update, site_evaluation), so the
site's UI and lineage show every round it took part in. The reply carries only tensors,
counts and metrics, is signed with the site's key, and passes the identifier guard.

The network monitor's statistics request is answered without Dagster: the site's
aggregates are computed from its own lake (kaapana_assets/monitoring/figures.py) and small
cells are suppressed before the reply is signed, with the hub's threshold but never below
the site's own floor (node config `min-cell-size`, default 5).

SuperNode node config: `kaapana-home` (the site's home), `site` (its name), optionally
`device`, `threads` and `min-cell-size`. The site key comes from $KAAPANA_SITE_KEY or node
config `key-file`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from kaapana_assets.federated.channel import (
    ARRAYS,
    CONFIG,
    IDENTITY_EXPERIMENT,
    METRICS,
    Kind,
    UpdateRejected,
    content_bytes,
    metrics_record,
    read_manifest,
    seal,
    verify,
    weight_records,
    weights_of,
)
from kaapana_assets.federated.guard import leaked_identifiers, site_identifiers
from kaapana_assets.federated.keys import validate_site_key
from kaapana_assets.federated.store import FederationStore, checked_name
from kaapana_assets.home import KaapanaHome
from kaapana_assets.lake import Lake
from kaapana_assets.monitoring.figures import DEFAULT_THRESHOLD, MAX_THRESHOLD, site_answer
from kaapana_assets.monitoring.figures import EXPERIMENT as STATISTICS_EXPERIMENT

EXPERIMENTS = "federated_experiments"


@dataclass(frozen=True)
class SiteSettings:
    site: str
    home: Path
    key: str
    device: str = "auto"
    threads: int = 2
    min_cell_size: int = DEFAULT_THRESHOLD  # the site's own floor for small-cell suppression

    @classmethod
    def from_context(cls, context: Context) -> SiteSettings:
        config = context.node_config
        if "kaapana-home" not in config or "site" not in config:
            raise RuntimeError("this SuperNode has no site: start it with "
                               "--node-config 'kaapana-home=\"/path\" site=\"name\"'")
        site = checked_name("site", str(config["site"]))
        key = os.environ.get("KAAPANA_SITE_KEY", "")
        if not key and "key-file" in config:
            key = Path(str(config["key-file"])).read_text().strip()
        if not key:
            raise RuntimeError(f"site {site} has no key: set KAAPANA_SITE_KEY or node config key-file")
        floor = int(str(config.get("min-cell-size", DEFAULT_THRESHOLD)))
        if not 1 <= floor <= MAX_THRESHOLD:
            raise RuntimeError(f"min-cell-size {floor} of site {site} is outside 1..{MAX_THRESHOLD}")
        return cls(site, Path(str(config["kaapana-home"])), validate_site_key(key, site),
                   str(config.get("device", "auto")), int(str(config.get("threads", 2))), floor)

    @property
    def store(self) -> FederationStore:
        return FederationStore(KaapanaHome(self.home).site_federation)


def materialize_at_site(settings: SiteSettings, asset: str, experiment: str, partition_key: str) -> None:
    """Run one site asset in the site's own Dagster instance (<home>/dagster); raise with
    the step's error when it fails (the hub receives the message)."""
    import dagster as dg

    from kaapana_assets.federated.assets import SITE_ASSETS
    from resources.build import site_resources
    from resources.federation import FederatedSiteResource

    home = settings.home
    if not home.exists():
        raise RuntimeError(f"site home {home} does not exist")
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    (home / "dagster" / "dagster.yaml").touch()  # the site instance: sqlite storage beside it
    resources = {**site_resources(home, site=settings.site, device=settings.device, threads=settings.threads),
                 "federated_site": FederatedSiteResource(name=settings.site, folder=str(settings.store.root))}
    instance = dg.DagsterInstance.local_temp(str(home / "dagster"))
    try:
        if not instance.has_dynamic_partition(EXPERIMENTS, experiment):
            instance.add_dynamic_partitions(EXPERIMENTS, [experiment])
        result = dg.materialize([SITE_ASSETS[asset]], partition_key=partition_key, instance=instance,
                                resources=resources, raise_on_error=False,
                                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
                                tags={"kaapana/federated": "true", "kaapana/site": settings.site})
        if not result.success:
            failures = [e.step_failure_data.error.message.strip() for e in result.get_step_failure_events()
                        if e.step_failure_data.error]
            raise RuntimeError(f"{asset}[{partition_key}] failed at {settings.site} (run {result.run_id}): "
                               + (failures[0][:500] if failures else "see the site's Dagster UI"))
    finally:
        instance.dispose()


def _receive(settings: SiteSettings, msg: Message, kind: Kind) -> tuple[str, int]:
    """Verify a message from the hub and put what it carries into the site's folder."""
    manifest, _ = read_manifest(msg.content)
    try:
        verify(msg.content, settings.key, kind, manifest.experiment, manifest.round, settings.site)
    except UpdateRejected as exc:
        raise RuntimeError(f"{settings.site} refuses the hub's {kind}: {exc.reason}: {exc.message}") from None
    experiment, round_ = checked_name("experiment", manifest.experiment), manifest.round
    store, config = settings.store, msg.content[CONFIG]
    for name in ("experiment", "plans", "fingerprint", "dataset"):
        if name in config:
            store.write_json(experiment, name, json.loads(str(config[name])))
    if ARRAYS in msg.content:
        # The weights this site trains from (or scores) are the ones the hub signed.
        store.write_global(experiment, round_ - 1 if kind == Kind.TRAIN else round_, weights_of(msg.content))
    return experiment, round_


def _reply(msg: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=msg)  # the reply inherits what is left of the hub's TTL


def identify(settings: SiteSettings, msg: Message) -> Message:
    challenge = str(msg.content[CONFIG]["challenge"])
    reply = RecordDict({CONFIG: ConfigRecord({"site": settings.site})})
    return _reply(msg, seal(reply, Kind.IDENTITY, IDENTITY_EXPERIMENT, 0, settings.site, 0, settings.key,
                                 nonce=challenge))


def fingerprint(settings: SiteSettings, msg: Message) -> Message:
    experiment, _ = _receive(settings, msg, Kind.FINGERPRINT_REQUEST)
    materialize_at_site(settings, "site_fingerprint", experiment, experiment)
    payload = settings.store.read_message(experiment, 0, "fingerprint", settings.site).decode()
    cases = int(json.loads(payload)["cases"])
    reply = RecordDict({CONFIG: ConfigRecord({"fingerprint": payload})})
    return _reply(msg, seal(reply, Kind.FINGERPRINT, experiment, 0, settings.site, cases, settings.key))


# The training steps import Dagster, nnU-Net's helpers and the hub's modules when they run:
# a ClientApp process starts per message, and a statistics request needs none of them.

def train(settings: SiteSettings, msg: Message) -> Message:
    from kaapana_assets.federated.hub import ExperimentSpec
    from kaapana_assets.federated.partitions import round_key
    from kaapana_assets.federated.payload import unpack_update
    from kaapana_assets.federated.privacy import privatize

    experiment, round_ = _receive(settings, msg, Kind.TRAIN)
    materialize_at_site(settings, "site_update", experiment, round_key(experiment, round_))
    update = unpack_update(settings.site, settings.store.read_message(experiment, round_, "update", settings.site))
    spec = ExperimentSpec(**settings.store.read_json(experiment, "experiment"))
    weights = update.weights
    if spec.dp.enabled:  # Flower's local DP: clip the update, add Gaussian noise, before anything leaves
        weights = privatize(weights, settings.store.read_global(experiment, round_ - 1), spec.dp)
    reply = RecordDict({**weight_records(weights), METRICS: metrics_record(update.cases, update.metrics)})
    return _reply(msg, seal(reply, Kind.UPDATE, experiment, round_, settings.site, update.cases, settings.key))


def evaluate(settings: SiteSettings, msg: Message) -> Message:
    from kaapana_assets.federated.partitions import round_key
    from kaapana_assets.federated.payload import unpack_update

    experiment, round_ = _receive(settings, msg, Kind.EVALUATE)
    materialize_at_site(settings, "site_evaluation", experiment, round_key(experiment, round_))
    evaluation = unpack_update(settings.site, settings.store.read_message(experiment, round_, "evaluation",
                                                                           settings.site))
    reply = RecordDict({METRICS: metrics_record(evaluation.cases, evaluation.metrics)})
    return _reply(msg, seal(reply, Kind.EVALUATION, experiment, round_, settings.site, evaluation.cases,
                                 settings.key))


def statistics(settings: SiteSettings, msg: Message) -> Message:
    """The site's aggregates for the hub's network monitor: computed from the site's own
    lake, small cells suppressed here, before the reply is signed (no Dagster run)."""
    manifest, _ = read_manifest(msg.content)
    try:
        verify(msg.content, settings.key, Kind.STATISTICS_REQUEST, STATISTICS_EXPERIMENT, manifest.round,
               settings.site)
    except UpdateRejected as exc:
        raise RuntimeError(f"{settings.site} refuses the hub's statistics request: {exc.reason}: {exc.message}") from None
    request = json.loads(str(msg.content[CONFIG]["request"]))
    requested = request.get("threshold", DEFAULT_THRESHOLD)
    if not isinstance(requested, int) or isinstance(requested, bool) or not 1 <= requested <= MAX_THRESHOLD:
        raise RuntimeError(f"{settings.site} refuses a statistics request with threshold {requested!r}")
    answer = site_answer(Lake(settings.home / "lake"), settings.site, max(requested, settings.min_cell_size))
    reply = RecordDict({CONFIG: ConfigRecord({"statistics": answer.dumps()})})
    # The manifest's case count is 0: a count there would bypass the suppression.
    return _reply(msg, seal(reply, Kind.STATISTICS, STATISTICS_EXPERIMENT, manifest.round, settings.site, 0,
                                 settings.key))


def identifier_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: no reply carrying one of this site's identifiers leaves the site."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    settings = SiteSettings.from_context(context)
    lake = Lake(settings.home / "lake")
    leaked = leaked_identifiers(content_bytes(reply.content), site_identifiers(lake)) if lake.exists("instances") else []
    if leaked:
        raise RuntimeError(f"{settings.site} refuses to send: {len(leaked)} identifier(s) of its data in the reply")
    return reply


app = ClientApp(mods=[identifier_guard])


@app.query()
def query(msg: Message, context: Context) -> Message:
    settings = SiteSettings.from_context(context)
    if "challenge" in msg.content.get(CONFIG, {}):
        return identify(settings, msg)
    if read_manifest(msg.content)[0].kind == Kind.STATISTICS_REQUEST:
        return statistics(settings, msg)
    return fingerprint(settings, msg)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    return train(SiteSettings.from_context(context), msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    return evaluate(SiteSettings.from_context(context), msg)
