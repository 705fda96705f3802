"""The privacy budget of a federated experiment, counted with Google's dp-accounting.

What is counted: every update a site released to the hub. Each one is the Gaussian
mechanism on the site's clipped update (privacy.py): the update is clipped to L2 norm
`clipping_norm`, so adding or removing the site's contribution moves it by at most that
norm, and the noise multiplier is z = σ / clipping_norm (σ as privacy.py adds it, from
`sensitivity`, ε and δ of one round; when `sensitivity` is below the clipping norm the
per-round ε the settings name understates what the round spends, and z says so). The
mechanism runs on all of the site's training cases (sampling rate 1.0); a mechanism with a
Poisson-sampled fraction of the data is accounted as such.

A site's releases are composed into ε at the experiment's δ with the RDP accountant: its ε
is an upper bound (looser than PLD's: the safe side for refusing a round), it composes any
number of rounds with no discretisation to choose, and a round without noise gives ε = ∞
rather than an error. A round a site missed (no reply) spent nothing; a round retried after
it failed spent once per attempt whose update reached the hub.

The ledger of releases lives in the hub's federation folder (`privacy_ledger.json`),
written by the hub's round as the updates arrive, before quorum is decided.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import dp_accounting
from dp_accounting.rdp import RdpAccountant

from kaapana_assets.federation.store import FederationStore

if TYPE_CHECKING:
    from kaapana_assets.federated.hub import Privacy

LEDGER = "privacy_ledger"


@dataclass(frozen=True)
class RoundMechanism:
    """What one site releases in one round: its clipped update with Gaussian noise."""

    noise_multiplier: float  # σ / clipping norm (the update's L2 sensitivity)
    sampling_rate: float = 1.0  # the fraction of the site's data the round used, Poisson-sampled

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0 or not 0 < self.sampling_rate <= 1:
            raise ValueError(f"noise multiplier {self.noise_multiplier} must be ≥ 0 and sampling rate "
                             f"{self.sampling_rate} in (0, 1]")

    def event(self) -> dp_accounting.DpEvent:
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        return gaussian if self.sampling_rate == 1 else dp_accounting.PoissonSampledDpEvent(self.sampling_rate,
                                                                                             gaussian)


@dataclass(frozen=True)
class PrivacyBudget:
    """What an experiment may spend per site over all its rounds."""

    max_epsilon: float
    delta: float


@dataclass(frozen=True)
class Release:
    """One site's noised update that reached the hub in one round."""

    site: str
    round: int
    mechanism: RoundMechanism


class BudgetExceeded(RuntimeError):
    """Round r would take a site beyond the experiment's budget: it is not started."""

    def __init__(self, experiment: str, round_: int, budget: PrivacyBudget, over: Mapping[str, tuple[float, float]]):
        self.experiment, self.round, self.budget, self.over = experiment, round_, budget, dict(over)
        sites = "; ".join(f"{site}: ε {before:.4g} so far, {after:.4g} after round {round_}"
                          for site, (before, after) in sorted(over.items()))
        super().__init__(f"round {round_} of {experiment} refused: it would exceed the privacy budget "
                         f"max_epsilon {budget.max_epsilon:g} at δ {budget.delta:g} ({sites}); nothing was sent")


def round_mechanism(privacy: Privacy) -> RoundMechanism:
    # Every training case of the site contributes to its update (no subsampling at the site).
    return RoundMechanism(privacy.noise_stdv / privacy.clipping_norm)


def budget_of(privacy: Privacy) -> PrivacyBudget | None:
    return PrivacyBudget(privacy.max_epsilon, privacy.delta) if privacy.max_epsilon is not None else None


def epsilon(mechanisms: Iterable[RoundMechanism], delta: float) -> float:
    """ε at δ of the mechanisms composed (RDP); 0.0 for none."""
    counts = Counter(mechanisms)
    if not counts:
        return 0.0
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(m.event(), n) for m, n in counts.items()]))
    return float(accountant.get_epsilon(delta))


def spent(releases: Sequence[Release], sites: Iterable[str], delta: float) -> dict[str, float]:
    """ε so far of each site (0.0 for a site that released nothing)."""
    by_site: dict[str, list[RoundMechanism]] = {site: [] for site in sites}
    for release in releases:
        by_site.setdefault(release.site, []).append(release.mechanism)
    return {site: epsilon(mechanisms, delta) for site, mechanisms in sorted(by_site.items())}


def check_round(releases: Sequence[Release], experiment: str, round_: int, participants: Sequence[str],
                mechanism: RoundMechanism, budget: PrivacyBudget) -> dict[str, float]:
    """ε of each participant if round r runs (every participant releasing once more);
    raises BudgetExceeded naming every site that would go beyond the budget."""
    before = spent(releases, participants, budget.delta)
    after = spent([*releases, *(Release(site, round_, mechanism) for site in participants)], participants,
                  budget.delta)
    over = {site: (before[site], after[site]) for site in participants
            if not after[site] <= budget.max_epsilon}  # inf and nan are over too
    if over:
        raise BudgetExceeded(experiment, round_, budget, over)
    return {site: after[site] for site in participants}


def read_releases(store: FederationStore, experiment: str) -> list[Release]:
    path = store.experiment_dir(experiment) / f"{LEDGER}.json"
    if not path.exists():
        return []
    return [Release(r["site"], int(r["round"]), RoundMechanism(**r["mechanism"]))
            for r in store.read_json(experiment, LEDGER)["releases"]]


def record_releases(store: FederationStore, experiment: str, releases: Sequence[Release]) -> list[Release]:
    """Append to the ledger; returns all of it."""
    ledger = [*read_releases(store, experiment), *releases]
    store.write_json(experiment, LEDGER, {"releases": [asdict(r) for r in ledger]})
    return ledger

