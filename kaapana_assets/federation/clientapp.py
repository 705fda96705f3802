"""A site's Flower ClientApp: runs in a process the site's SuperNode starts, at the site,
against the site's own KAAPANA_HOME. It proves which site it is (the hub's challenge,
signed with the site's key) and hands every other request to the site handler registered
for the request's kind (registry.py: federated training's steps materialize the site's
participation into the site's own Dagster instance; the network monitor answers from the
site's lake). Each handler verifies the hub's message with the site's key and signs its
reply; the identifier guard, the outermost mod, refuses any reply that carries one of the
site's identifiers. kaapana_assets/flower_apps.py makes the app, with the steps registered.

The site's own floor for small-cell suppression (node config `min-cell-size`, default 5)
is a setting of the site, not of a request: no step may send counts below it. Likewise its
consent to cross-site evaluation (node config `share-local-model`, default false): a
consenting site trains a local-only baseline whose weights go to the hub and from there
to every other site, to be evaluated on their data; a site that has not consented declines.

SuperNode node config: `kaapana-home` (the site's home), `site` (its name), optionally
`device`, `threads`, `min-cell-size` and `share-local-model`. The site key comes from $KAAPANA_SITE_KEY or node
config `key-file`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from kaapana_assets.environment import Environment
from kaapana_assets.federation.channel import (
    CONFIG,
    IDENTITY_EXPERIMENT,
    Kind,
    content_bytes,
    message_type,
    read_manifest,
    seal,
)
from kaapana_assets.federation.guard import DEFAULT_THRESHOLD, MAX_THRESHOLD, leaked_identifiers, site_identifiers
from kaapana_assets.federation.keys import validate_site_key
from kaapana_assets.federation.registry import site_handler
from kaapana_assets.federation.store import FederationStore, checked_name
from kaapana_assets.home import KaapanaHome
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES


@dataclass(frozen=True)
class SiteSettings:
    site: str
    home: Path
    key: str
    device: str = "auto"
    threads: int = 2
    min_cell_size: int = DEFAULT_THRESHOLD  # the site's own floor for small-cell suppression
    share_local_model: bool = False  # consent: its local baseline's weights may travel to the other sites
    lake: Lake | None = None  # KAAPANA_LAKE_URI of the site's platform; None: <home>/lake

    def site_lake(self) -> Lake:
        return self.lake or Lake(self.home / "lake")

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
        consent = str(config.get("share-local-model", "false")).lower()
        if consent not in {"true", "false"}:
            raise RuntimeError(f"share-local-model of site {site} must be true or false, not {consent!r}")
        home = Path(str(config["kaapana-home"]))
        lake = Lake.of(Environment.read(home=home))  # the site's KAAPANA_LAKE_URI and S3 settings
        return cls(site, home, validate_site_key(key, site),
                   str(config.get("device", "auto")), int(str(config.get("threads", 2))), floor,
                   share_local_model=consent == "true", lake=lake)

    @property
    def store(self) -> FederationStore:
        return FederationStore(KaapanaHome(self.home).site_federation)


def reply(msg: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=msg)  # the reply inherits what is left of the hub's TTL


def identify(settings: SiteSettings, msg: Message) -> Message:
    challenge = str(msg.content[CONFIG]["challenge"])
    content = RecordDict({CONFIG: ConfigRecord({"site": settings.site})})
    return reply(msg, seal(content, Kind.IDENTITY, IDENTITY_EXPERIMENT, 0, settings.site, 0, settings.key,
                           nonce=challenge))


def identifier_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: no reply carrying one of this site's identifiers leaves the site."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    settings = SiteSettings.from_context(context)
    lake = settings.site_lake()
    leaked = leaked_identifiers(content_bytes(reply.content), site_identifiers(lake)) if lake.exists(INSTANCES) else []
    if leaked:
        raise RuntimeError(f"{settings.site} refuses to send: {len(leaked)} identifier(s) of its data in the reply")
    return reply


def answer(msg: Message, context: Context) -> Message:
    """Every message from the hub: the challenge, or the request of a registered step. A
    request must come as the message type its kind travels as."""
    settings = SiteSettings.from_context(context)
    if msg.metadata.message_type == MessageType.QUERY and "challenge" in msg.content.get(CONFIG, {}):
        return identify(settings, msg)
    kind = read_manifest(msg.content)[0].kind
    handler = site_handler(kind)
    if handler is None:
        raise RuntimeError(f"{settings.site} answers no {kind!r} request: no step registered for it")
    if msg.metadata.message_type != message_type(Kind(kind)):
        raise RuntimeError(f"{settings.site} refuses a {kind} request sent as a {msg.metadata.message_type} message")
    return handler(settings, msg)


def client_app() -> ClientApp:
    """The site's ClientApp (made once, by kaapana_assets/flower_apps.py)."""
    app = ClientApp(mods=[identifier_guard])
    app.query()(answer)
    app.train()(answer)
    app.evaluate()(answer)
    return app


__all__ = ["SiteSettings", "answer", "client_app", "identifier_guard", "identify", "reply"]
