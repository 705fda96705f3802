"""The hub's side of the network monitor: the request it sends, the answers it keeps, and
one collection merged into rows of `network_statistics` (every site's cells and the network
total) and `network_sites` (who answered, who is stale and why).

A site that does not answer (or whose answer is refused) is reported *stale* with its last
known figures — the last answer the hub accepted from it, kept in the hub's own federation
folder — or *unavailable* when it never answered. The network total adds up every site's
latest figures, fresh or stale. A cell that some site withheld has no exact total: its
`count` is null, like a site's suppressed cell, `suppressed_sites` says how many sites
withheld it and `reported` gives the lower bound (">=N": the counts sent in the clear plus
one per withheld cell, each being at least 1).

Plain module: no Dagster, no Flower.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kaapana_assets.federation.store import FederationStore, checked_name
from kaapana_assets.monitoring.figures import (
    ALL,
    EXPERIMENT,
    METRICS,
    AnswerRefused,
    CellKey,
    SiteAnswer,
    parse_answer,
)

NETWORK = "network"  # the `site` of the network total's rows
FRESH, STALE, UNAVAILABLE, TOTAL = "fresh", "stale", "unavailable", "total"


def new_request_id() -> int:
    """A collection's number: milliseconds since the epoch. It is the `round` of the signed
    messages, so an answer to an earlier collection is refused as replayed."""
    return time.time_ns() // 1_000_000


def _request_name(request: int) -> str:
    return f"request-{int(request)}"


@dataclass(frozen=True)
class StatisticsRequest:
    """What a collection asks of the sites: the small-cell threshold, and how long it waits."""

    threshold: int
    timeout_s: float
    project: str | None = None  # count one research project's series only; None: the whole site


def write_request(store: FederationStore, request: int, threshold: int, timeout_s: float,
                  project: str | None = None) -> None:
    """What the ServerApp sends (it runs in a process of its own and reads it from here)."""
    written: dict[str, Any] = {"threshold": int(threshold), "timeout_s": float(timeout_s)}
    store.write_json(EXPERIMENT, _request_name(request), written if project is None else {**written, "project": project})


def read_request(store: FederationStore, request: int) -> StatisticsRequest:
    written = store.read_json(EXPERIMENT, _request_name(request))
    return StatisticsRequest(int(written["threshold"]), float(written["timeout_s"]), written.get("project"))


def remove_request(store: FederationStore, request: int) -> None:
    (store.experiment_dir(EXPERIMENT) / f"{_request_name(request)}.json").unlink(missing_ok=True)


def _last_name(site: str, project: str | None = None) -> str:
    # A project's figures are remembered apart: a stale site never shows another view's counts.
    return f"last-answer-{checked_name('site', site)}" + ("" if project is None else f"-project-{project}")


def remember(store: FederationStore, answers: Mapping[str, SiteAnswer]) -> None:
    """Keep each accepted answer as the site's last known figures (of its project)."""
    for site, answer in answers.items():
        store.write_json(EXPERIMENT, _last_name(site, answer.project), answer.to_json())


def last_known(store: FederationStore, site: str, project: str | None = None) -> SiteAnswer | None:
    path = store.experiment_dir(EXPERIMENT) / f"{_last_name(site, project)}.json"
    if not path.exists():
        return None
    data = store.read_json(EXPERIMENT, _last_name(site, project))
    try:
        return parse_answer(data, site, int(data.get("threshold", 1)), project)
    except AnswerRefused:
        return None


@dataclass(frozen=True)
class SiteOutcome:
    site: str
    status: str  # fresh | stale | unavailable
    answer: SiteAnswer | None  # the figures reported for the site (fresh or last known)
    reason: str | None = None
    message: str | None = None


@dataclass
class Collection:
    snapshot_id: str
    collected_at: dt.datetime
    threshold: int
    outcomes: list[SiteOutcome]
    cell_rows: list[dict[str, Any]] = field(default_factory=list)
    site_rows: list[dict[str, Any]] = field(default_factory=list)

    def outcome(self, site: str) -> SiteOutcome:
        return next(o for o in self.outcomes if o.site == site)

    @property
    def fresh(self) -> list[str]:
        return [o.site for o in self.outcomes if o.status == FRESH]

    @property
    def stale(self) -> list[str]:
        return [o.site for o in self.outcomes if o.status != FRESH]


def outcomes_from_result(result: Mapping[str, Any], sites: Sequence[str], threshold: int,
                         store: FederationStore, project: str | None = None) -> list[SiteOutcome]:
    """The ServerApp's result (answers verified on the channel) → one outcome per site of
    the federation, falling back to the last known figures of a site without an answer."""
    answers = result.get("answers", {}) if result.get("ok") else {}
    problems = {str(r["site"]): (str(r["reason"]), str(r["message"])) for r in result.get("rejected", [])}
    outcomes = []
    for site in sites:
        if site in answers:
            try:
                outcomes.append(SiteOutcome(site, FRESH, parse_answer(answers[site], site, threshold, project)))
                continue
            except AnswerRefused as exc:
                problems[site] = ("bad_payload", str(exc))
        if not result.get("ok"):
            problems.setdefault(site, ("channel", str(result.get("error", "the statistics run failed"))[:1000]))
        reason, message = problems.get(site, ("missing", "no answer"))
        known = last_known(store, site, project)
        outcomes.append(SiteOutcome(site, STALE if known else UNAVAILABLE, known, reason, message))
    return outcomes


def reported_total(clear: int, suppressed_sites: int) -> str:
    return str(clear) if not suppressed_sites else f">={clear + suppressed_sites}"


def network_totals(answers: Sequence[SiteAnswer]) -> dict[CellKey, tuple[int, int]]:
    """Per cell: (sum of the counts in the clear, number of sites that withheld it)."""
    totals: dict[CellKey, tuple[int, int]] = {}
    for answer in answers:
        for key, value in answer.cells.items():
            count, hidden = totals.get(key, (0, 0))
            totals[key] = (count + value, hidden) if isinstance(value, int) else (count, hidden + 1)
    return totals


def collect(snapshot_id: str, collected_at: dt.datetime, threshold: int,
            outcomes: Sequence[SiteOutcome], project: str | None = None) -> Collection:
    """Rows of `network_statistics` and `network_sites` for one collection (of one research
    project's series, or of whole sites: `project` None)."""
    if any(o.site == NETWORK for o in outcomes):
        raise ValueError(f"a site may not be called {NETWORK!r}: that is the network total's name")
    collection = Collection(snapshot_id, collected_at, threshold, list(outcomes))
    base = {"snapshot_id": snapshot_id, "collected_at": collected_at, "project": project}
    reporting = [o.answer for o in outcomes if o.answer is not None]
    for outcome in outcomes:
        answer = outcome.answer
        collection.site_rows.append({
            **base, "site": outcome.site, "status": outcome.status, "reason": outcome.reason,
            "message": outcome.message, "figures_at": answer.computed_at if answer else None,
            "last_ingest_at": answer.last_ingest_at if answer else None,
            "threshold": answer.threshold if answer else None, "cells": len(answer.cells) if answer else 0,
            "suppressed_cells": answer.suppressed_cells if answer else 0,
        })
        if answer is None:
            continue
        for (metric, dimension, label), value in sorted(answer.cells.items()):
            collection.cell_rows.append({
                **base, "site": outcome.site, "status": outcome.status, "figures_at": answer.computed_at,
                "metric": metric, "dimension": dimension, "category": label,
                "count": value if isinstance(value, int) else None, "suppressed": isinstance(value, str),
                "reported": str(value), "suppressed_sites": 0, "threshold": answer.threshold,
            })
    for (metric, dimension, label), (clear, hidden) in sorted(network_totals(reporting).items()):
        collection.cell_rows.append({
            **base, "site": NETWORK, "status": TOTAL, "figures_at": collected_at, "metric": metric,
            "dimension": dimension, "category": label, "count": None if hidden else clear, "suppressed": hidden > 0,
            "reported": reported_total(clear, hidden), "suppressed_sites": hidden, "threshold": threshold,
        })
    return collection


def pivot(collection: Collection) -> list[dict[str, Any]]:
    """One row per cell, one column per site and the network: what the asset's table shows."""
    sites = [o.site for o in collection.outcomes]
    rows: dict[CellKey, dict[str, Any]] = {}
    for row in collection.cell_rows:
        key = (row["metric"], row["dimension"], row["category"])
        rows.setdefault(key, {"metric": key[0], "dimension": key[1], "category": key[2],
                              **{s: "" for s in sites}, NETWORK: ""})[row["site"]] = row["reported"]
    order = {m: i for i, m in enumerate(METRICS)}
    return [rows[k] for k in sorted(rows, key=lambda k: (order.get(k[0], 99), k[1] != ALL, k[1], k[2]))]


__all__ = ["NETWORK", "Collection", "SiteOutcome", "StatisticsRequest", "collect", "last_known", "network_totals",
           "new_request_id", "outcomes_from_result", "pivot", "read_request", "remember", "remove_request",
           "write_request"]
