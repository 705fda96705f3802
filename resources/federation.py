"""Federation handles: the hub's (its SuperLink, the federation file, how experiments
train) and a site's (its name and its own federation folder). Thin: the Flower run and the
channel live in kaapana_assets/federation/, the site logic in kaapana_assets/federated/."""

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from kaapana_assets.federated.strategy import Strategy
from kaapana_assets.federation.runs import Connection, run_step
from kaapana_assets.federation.sites import FederationConfigError, SiteEntry, read_sites
from kaapana_assets.federation.store import FederationStore, checked_name
from kaapana_assets.federation.superlink import DEFAULT_ROUND_TIMEOUT_S, DEFAULT_TTL_S
from kaapana_assets.lake import Lake
from kaapana_assets.nnunet import Schedule, SchedulePreset
from resources.nnunet import NnunetResource

if TYPE_CHECKING:  # the site's training stack (torch, Flower) loads in the runs that use it
    from kaapana_assets.federated.site import SiteContext


class FederatedSiteResource(dg.ConfigurableResource):
    """This site's identity in a federation (site side): its name and its own federation
    folder, where the ClientApp puts what the hub sent and picks up what goes back."""

    name: str = Field(default="", description="Site name ($KAAPANA_SITE in build_resources)")
    folder: str = Field(description="The site's federation folder, e.g. $KAAPANA_HOME/federation/site")

    def context(self, lake: Lake, archive_root: Path, nnunet_settings: NnunetResource,
                log: Callable[[str], None]) -> "SiteContext":
        from kaapana_assets.federated.site import SiteContext

        if not self.name:
            raise dg.Failure(description="this site has no federation identity: set KAAPANA_SITE "
                             "(or configure the federated_site resource)")
        return SiteContext(
            site=checked_name("site", self.name), store=FederationStore(self.folder),
            lake=lake, archive_root=archive_root, work_root=nnunet_settings.work_root(),
            device=nnunet_settings.device, threads=nnunet_settings.threads, log=log,
        )


class FederationResource(dg.ConfigurableResource):
    """The hub's view of a federation: its SuperLink, its sites, and how experiments train."""

    superlink: str = Field(default="127.0.0.1:9092", description="host:port of the hub's SuperLink "
                           "(Control API; the same port the sites' SuperNodes dial)")
    root_certificate: str = Field(default="", description="CA certificate of the SuperLink's TLS certificate")
    federation_file: str = Field(default="", description="YAML listing the sites under `sites:` "
                                 "($KAAPANA_FEDERATION in build_resources)")
    folder: str = Field(description="The hub's own federation folder, e.g. $KAAPANA_HOME/federation/hub")
    cohort: str = Field(default="liver-train", description="The cohort every site trains on (each its own)")
    labels: list[str] = Field(default_factory=lambda: ["liver"], description="Labels every site must provide")
    rounds: int = Field(default=3, description="Rounds of an experiment")
    min_sites: int = Field(default=2, description="Quorum: updates a round needs to aggregate")
    strategy: str = Field(default="fedavg", description="Flower strategy: fedavg, fedavgm, fedprox, median or "
                          "trimmed_mean")
    server_momentum: float = Field(default=0.9, description="FedAvgM: the hub's momentum over rounds (0 < m < 1)")
    proximal_mu: float = Field(default=0.0, description="FedProx: weight of the proximal term in local training")
    schedule: str = Field(default="", description="Local training preset (full, short, tiny); empty: short")
    local_epochs: int | None = Field(default=None, description="Local epochs per round (overrides the preset)")
    iterations_per_epoch: int | None = None
    base_features: int | None = Field(default=None, description="Network width of the first stage")
    timeout_s: float = Field(default=DEFAULT_ROUND_TIMEOUT_S, description="How long a phase of a round waits "
                             "for the sites' replies")
    message_ttl_s: float = Field(default=DEFAULT_TTL_S, description="Flower message TTL")
    dp_clipping_norm: float = Field(default=0.0, description="Local DP: L2 clipping norm of a site's update; 0: off")
    dp_epsilon: float = Field(default=1.0, description="Local DP: privacy budget per round")
    dp_delta: float = Field(default=1e-5, description="Local DP: failure probability")
    dp_sensitivity: float = Field(default=1.0, description="Local DP: sensitivity")
    dp_max_epsilon: float | None = Field(default=None, description="Local DP: the experiment's privacy budget, "
                                         "ε per site over all rounds at dp_delta; a round that would exceed it "
                                         "is refused. None: ε is counted, nothing refused")
    seed: int = Field(default=0, description="Seed of the shared initial network and of each site's local training (derived per round and site)")

    def sites(self) -> list[SiteEntry]:
        if not self.federation_file:
            raise dg.Failure(description="no federation configured: set KAAPANA_FEDERATION=path/to/federation.yaml "
                             "(sites under `sites:`; see `kaapana federation --help`)")
        try:
            return read_sites(self.federation_file)
        except FederationConfigError as exc:
            raise dg.Failure(description=str(exc)) from None

    def store(self) -> FederationStore:
        return FederationStore(self.folder)

    def connection(self) -> Connection:
        if not self.root_certificate:
            raise dg.Failure(description="the federation has no root_certificate: TLS to the SuperLink is always on")
        return Connection(self.superlink, Path(self.root_certificate), self.store().root / "flwr")

    def training_schedule(self) -> Schedule:
        return Schedule.preset(self.schedule or SchedulePreset.SHORT, epochs=self.local_epochs,
                               iterations_per_epoch=self.iterations_per_epoch, base_features=self.base_features,
                               proximal_mu=self.proximal_mu if self.aggregation_strategy() is Strategy.FEDPROX else None)

    def aggregation_strategy(self) -> Strategy:
        """The configured `strategy`, parsed (a clear error listing the strategies)."""
        return Strategy.parse(self.strategy)

    def privacy(self) -> dict[str, float]:
        if self.dp_clipping_norm <= 0:
            if self.dp_max_epsilon is not None:  # a budget without noise would run the rounds unprotected
                raise dg.Failure(description="dp_max_epsilon is set but local DP is off: set dp_clipping_norm > 0")
            return {}
        return {"clipping_norm": self.dp_clipping_norm, "epsilon": self.dp_epsilon, "delta": self.dp_delta,
                "sensitivity": self.dp_sensitivity,
                **({"max_epsilon": self.dp_max_epsilon} if self.dp_max_epsilon is not None else {})}

    def run_step(self, step: str, experiment: str, round_: int, log: Callable[[str], None]) -> dict:
        """One Flower run performing one step; the ServerApp's result."""
        return run_step(self.connection(), self.store(), Path(self.federation_file), step, experiment, round_,
                        self.timeout_s, self.message_ttl_s, log)
