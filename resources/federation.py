"""Federation: the sites of an experiment and how the hub reaches each of them.

Two transports behind one code path (`FederationResource.run_on_sites`):
  local    the site's job runs in this process against the site's own KAAPANA_HOME and
           its own Dagster instance (<home>/dagster): tests, the demo, sites on one machine.
  graphql  the site's job is submitted to the site's own Dagster webserver with
           DagsterGraphQLClient (the partition goes as the `dagster/partition` tag) and
           polled; the update arrives through the exchange store, sealed with the site's key.
The hub never sees a site's data: only what the site's job writes to the exchange.
"""

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import dagster as dg
import yaml
from pydantic import Field

from kaapana_assets.environment import Environment
from kaapana_assets.federated.exchange import InvalidSiteKey, validate_site_key
from kaapana_assets.federated.site import SiteContext
from kaapana_assets.federated.store import ExchangeStore, checked_name
from kaapana_assets.lake import Lake
from kaapana_assets.training.nnunet import Schedule
from resources.nnunet import NnunetResource

EXPERIMENTS = "federated_experiments"
ASSET_JOB = "__ASSET_JOB"


def default_exchange() -> Path:
    return Environment.read().exchange


class FederatedSiteResource(dg.ConfigurableResource):
    """This site's identity in a federation (site side): its name, its own key, the exchange."""

    name: str = Field(default="", description="Site name ($KAAPANA_SITE in build_resources)")
    key: str = Field(default="", description="This site's AES-256 key, base64 (dg.EnvVar('KAAPANA_SITE_KEY'))")
    exchange: str = Field(default="", description="Exchange store; empty: $KAAPANA_EXCHANGE or $KAAPANA_HOME/exchange")

    def context(self, lake: Lake, archive_root: Path, nnunet_settings: NnunetResource,
                log: Callable[[str], None]) -> SiteContext:
        name, key = self.name, self.key
        if not name or not key:
            raise dg.Failure(description="this site has no federation identity: set KAAPANA_SITE and KAAPANA_SITE_KEY "
                             "(or configure the federated_site resource)")
        try:
            key = validate_site_key(key, name)
        except InvalidSiteKey as exc:
            raise dg.Failure(description=str(exc)) from None
        return SiteContext(
            site=checked_name("site", name), key=key, store=ExchangeStore(self.exchange or default_exchange()),
            lake=lake, archive_root=archive_root, work_root=nnunet_settings.work_root(),
            device=nnunet_settings.device, threads=nnunet_settings.threads, log=log,
        )


class FederatedSite(dg.Config):
    name: str = Field(description="Site name (letters, digits, '.', '_', '-')")
    transport: Literal["local", "graphql"] = "local"
    home: str = Field(default="", description="local: the site's KAAPANA_HOME")
    url: str = Field(default="", description="graphql: host:port of the site's Dagster webserver")
    key: str = Field(default="", description="The site's AES-256 key (base64); prefer key_env for secrets")
    key_env: str = Field(default="", description="Environment variable holding the site's key")
    location: str = Field(default="", description="graphql: code location holding the site assets; empty: the first")
    device: str = Field(default="auto", description="local: the device this site trains on")
    threads: int = Field(default=2, description="local: CPU threads this site uses")

    def secret(self) -> str:
        key = self.key or (os.environ.get(self.key_env, "") if self.key_env else "")
        if not key:
            raise dg.Failure(description=f"no key for site {self.name}: set its key or key_env")
        try:  # validated when loaded: a malformed key is a configuration error, not tampering
            return validate_site_key(key, self.name)
        except InvalidSiteKey as exc:
            raise dg.Failure(description=str(exc)) from None


@dataclass
class SiteRun:
    site: str
    ok: bool
    message: str = ""
    run_id: str | None = None


class LocalTransport:
    """The site job in-process, against the site's own home and Dagster instance."""

    def __init__(self, site: FederatedSite, exchange: Path):
        self.site, self.exchange = site, exchange

    def start(self, asset: str, experiment: str, partition_key: str) -> SiteRun:
        from kaapana_assets.federated.assets import SITE_ASSETS
        from resources.storage import site_resources

        home = Path(self.site.home)
        if not self.site.home or not home.exists():
            return SiteRun(self.site.name, False, f"site home {self.site.home!r} does not exist")
        (home / "dagster").mkdir(parents=True, exist_ok=True)
        (home / "dagster" / "dagster.yaml").touch()  # the site instance: sqlite storage beside it
        resources = {
            **site_resources(home, site=self.site.name, device=self.site.device, threads=self.site.threads),
            "federated_site": FederatedSiteResource(name=self.site.name, key=self.site.secret(),
                                                    exchange=str(self.exchange)),
        }
        instance = dg.DagsterInstance.local_temp(str(home / "dagster"))
        try:
            if not instance.has_dynamic_partition(EXPERIMENTS, experiment):
                instance.add_dynamic_partitions(EXPERIMENTS, [experiment])
            # The site's full log is in its own instance; here only what goes wrong.
            result = dg.materialize([SITE_ASSETS[asset]], partition_key=partition_key, instance=instance,
                                    resources=resources, raise_on_error=False,
                                    run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
                                    tags={"kaapana/federated": "true", "kaapana/site": self.site.name})
            if result.success:
                return SiteRun(self.site.name, True, run_id=result.run_id)
            failures = [e.step_failure_data.error.message.strip() for e in result.get_step_failure_events()
                        if e.step_failure_data.error]
            return SiteRun(self.site.name, False, failures[0] if failures else "the site run failed", result.run_id)
        finally:
            instance.dispose()

    def wait(self, handle: SiteRun, deadline: float) -> SiteRun:
        return handle  # already finished: local runs are synchronous


REPOSITORIES = """query { repositoriesOrError { __typename
  ... on RepositoryConnection { nodes { name location { name } } }
  ... on PythonError { message } } }"""

ADD_PARTITION = """mutation($selector: RepositorySelector!, $name: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $selector, partitionsDefName: $name, partitionKey: $key) {
    __typename ... on PythonError { message } ... on UnauthorizedError { message } } }"""

TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


class GraphqlTransport:
    """The site job on the site's own Dagster webserver."""

    def __init__(self, site: FederatedSite, poll_interval_s: float, connection_errors: int = 3):
        self.site, self.poll_interval_s, self.connection_errors = site, poll_interval_s, connection_errors
        address = site.url.removeprefix("http://").removeprefix("https://").rstrip("/")
        host, _, port = address.partition(":")
        self.host, self.port, self.https = host, int(port) if port else None, site.url.startswith("https://")

    def client(self):
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient(self.host, port_number=self.port, use_https=self.https, timeout=60)

    def _repository(self, client) -> tuple[str, str]:
        # DagsterGraphQLClient has no call for these two; _execute runs a documented GraphQL query.
        data = client._execute(REPOSITORIES)["repositoriesOrError"]
        nodes = data.get("nodes") or []
        for node in nodes:
            if not self.site.location or node["location"]["name"] == self.site.location:
                return node["location"]["name"], node["name"]
        raise RuntimeError(f"site {self.site.name} serves no code location {self.site.location or ''}".strip())

    def start(self, asset: str, experiment: str, partition_key: str) -> SiteRun:
        client = self.client()
        location, repository = self._repository(client)
        added = client._execute(ADD_PARTITION, {
            "selector": {"repositoryLocationName": location, "repositoryName": repository},
            "name": EXPERIMENTS, "key": experiment})["addDynamicPartition"]
        if added["__typename"] not in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError"):
            raise RuntimeError(f"site {self.site.name} refused partition {experiment}: {added.get('message', added)}")
        tags = {"dagster/partition": partition_key, "kaapana/federated": "true"}
        if "|" in partition_key:  # a multi-partition key also travels as its dimensions
            exp, round_ = partition_key.split("|")
            tags |= {"dagster/partition/experiment": exp, "dagster/partition/round": round_}
        run_id = client.submit_job_execution(ASSET_JOB, repository_location_name=location, repository_name=repository,
                                             asset_selection=[dg.AssetKey(asset)], tags=tags)
        return SiteRun(self.site.name, False, "submitted", run_id)

    def wait(self, handle: SiteRun, deadline: float) -> SiteRun:
        client, errors = self.client(), 0
        while time.monotonic() < deadline:
            try:
                status = client.get_run_status(handle.run_id).value
                errors = 0
            except Exception as exc:  # noqa: BLE001 - the site may be gone: count, then give up
                errors += 1
                if errors >= self.connection_errors:
                    return SiteRun(self.site.name, False, f"site unreachable: {str(exc)[:200]}", handle.run_id)
                time.sleep(self.poll_interval_s)
                continue
            if status in TERMINAL:
                ok = status == "SUCCESS"
                return SiteRun(self.site.name, ok, "" if ok else f"site run {handle.run_id} ended {status} "
                               "(see the site's Dagster UI)", handle.run_id)
            time.sleep(self.poll_interval_s)
        try:
            client.terminate_run(handle.run_id)
        except Exception:  # noqa: BLE001 - best effort
            pass
        return SiteRun(self.site.name, False, "timed out", handle.run_id)


class FederationResource(dg.ConfigurableResource):
    """The hub's view of a federation: sites, exchange, and how experiments train."""

    sites: list[FederatedSite] = Field(default_factory=list,
                                       description="The sites; empty: read from federation_file")
    federation_file: str = Field(default="", description="YAML file listing the sites under `sites:` "
                                 "($KAAPANA_FEDERATION in build_resources)")
    exchange: str = Field(default="", description="Exchange store; empty: $KAAPANA_EXCHANGE or $KAAPANA_HOME/exchange")
    cohort: str = Field(default="liver-train", description="The cohort every site trains on (each its own)")
    labels: list[str] = Field(default_factory=lambda: ["liver"], description="Labels every site must provide")
    rounds: int = Field(default=3, description="Rounds of an experiment")
    min_sites: int = Field(default=2, description="Quorum: updates a round needs to aggregate")
    strategy: str = Field(default="fedavg", description="fedavg or median")
    schedule: str = Field(default="", description="Local training preset (full, short, tiny); empty: short")
    local_epochs: int | None = Field(default=None, description="Local epochs per round (overrides the preset)")
    iterations_per_epoch: int | None = None
    base_features: int | None = Field(default=None, description="Network width of the first stage")
    timeout_s: float = Field(default=3600.0, description="How long a round waits for its sites")
    poll_interval_s: float = 2.0
    seed: int = Field(default=0, description="Seed of the shared initial network")

    def site_list(self) -> list[FederatedSite]:
        if self.sites:
            return list(self.sites)
        path = self.federation_file
        if not path:
            raise dg.Failure(description="no federation sites configured: set FederationResource.sites or "
                             "federation_file (KAAPANA_FEDERATION=path/to/federation.yaml, a list under `sites:`)")
        data = yaml.safe_load(Path(path).read_text()) or {}
        return [FederatedSite(**entry) for entry in data.get("sites", [])]

    def store(self) -> ExchangeStore:
        return ExchangeStore(self.exchange or default_exchange())

    def site_keys(self) -> dict[str, str]:
        return {site.name: site.secret() for site in self.site_list()}

    def training_schedule(self) -> Schedule:
        name = self.schedule or "short"
        return Schedule.preset(name, epochs=self.local_epochs, iterations_per_epoch=self.iterations_per_epoch,
                               base_features=self.base_features)

    def transport(self, site: FederatedSite) -> LocalTransport | GraphqlTransport:
        if site.transport == "local":
            return LocalTransport(site, self.store().root)
        return GraphqlTransport(site, self.poll_interval_s)

    def run_on_sites(self, asset: str, experiment: str, round_: int | None, sites: list[str],
                     log: Callable[[str], None]) -> dict[str, SiteRun]:
        """Run one site-side asset on every named site; a site that fails or cannot be
        reached is reported, never fatal here (the quorum decides)."""
        partition_key = experiment if round_ is None else f"{experiment}|{round_}"
        by_name = {site.name: site for site in self.site_list()}
        results: dict[str, SiteRun] = {}
        started: dict[str, tuple[LocalTransport | GraphqlTransport, SiteRun]] = {}
        for name in sites:
            transport = self.transport(by_name[name])
            log(f"{asset}[{partition_key}] → {name} ({by_name[name].transport})")
            try:
                started[name] = (transport, transport.start(asset, experiment, partition_key))
            except Exception as exc:  # noqa: BLE001 - an unreachable site is a failed site
                results[name] = SiteRun(name, False, f"could not start: {str(exc)[:300]}")
        deadline = time.monotonic() + self.timeout_s
        for name, (transport, handle) in started.items():
            results[name] = transport.wait(handle, deadline)
        for name in sites:
            run = results[name]
            log(f"{asset}[{partition_key}] at {name}: " + ("done" if run.ok else f"FAILED: {run.message}"))
        return results
