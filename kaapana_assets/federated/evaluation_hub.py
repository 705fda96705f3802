"""The hub's side of federated evaluation: what it asks the sites (an evaluation request,
read by the ServerApp's `evaluation` step), and what it makes of the aggregates they send
back (federated/site_evaluation.py):

  federated_evaluation  one model at every site: `federated_evaluations` rows, a box plot per site
  cross_site_evaluation every consenting site's local baseline and the global model at every
                        site: `cross_site_evaluations` rows, NVFlare's cross_val_results.json
                        layout, a heat map, and the answer (global vs the site's own model)

Plain module: no Dagster, no Flower."""

from __future__ import annotations

import datetime as dt
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kaapana_assets.federated.site_evaluation import GLOBAL, STATISTICS, Metric, ModelEvaluation
from kaapana_assets.federation.guard import DEFAULT_THRESHOLD, MAX_THRESHOLD
from kaapana_assets.federation.store import FederationStore, checked_name
from kaapana_assets.lake.digest import row_digest

REQUEST = "evaluation-request"
METRIC_TITLES = {Metric.DICE: "Dice", Metric.HD95: "HD95 (mm)", Metric.ASSD: "ASSD (mm)",
                 Metric.VOLUME_DIFFERENCE_ML: "volume difference (ml)"}
# Higher is better for Dice only: the answer compares models by it.
MATRIX_METRIC = Metric.DICE


@dataclass(frozen=True)
class EvaluationRequest:
    """What one `evaluation` step asks of every site: evaluate each model (owner → the weights
    the hub keeps for it) on the site's own version of `cohort`, suppressing below `threshold`.
    `request` numbers it (milliseconds since the epoch): the messages' round, so an answer to
    an earlier request is refused as replayed."""

    request: int
    cohort: str
    round: int  # the global model's round (its training lineage at each site)
    models: tuple[str, ...] = (GLOBAL,)  # GLOBAL and/or the sites whose local baselines go out
    threshold: int = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        checked_name("cohort", self.cohort)
        for model in self.models:
            checked_name("model", model)
        if isinstance(self.threshold, bool) or not 1 <= self.threshold <= MAX_THRESHOLD:
            raise ValueError(f"the small-cell threshold must be in 1..{MAX_THRESHOLD}, not {self.threshold}")
        if not self.models:
            raise ValueError("an evaluation request names at least one model")

    def message_round(self, model: str) -> int:
        """Each model goes out in an exchange of its own, with its own round: a reply about one
        model cannot stand in for another's."""
        return self.request * 100 + self.models.index(model)


def new_request_id() -> int:
    """A request's number: milliseconds since the epoch (as the network monitor numbers its collections)."""
    return time.time_ns() // 1_000_000


def write_request(store: FederationStore, experiment: str, request: EvaluationRequest) -> None:
    store.write_json(experiment, f"{REQUEST}-{request.request}",
                     {"request": request.request, "cohort": request.cohort, "round": request.round,
                      "models": list(request.models), "threshold": request.threshold})


def read_request(store: FederationStore, experiment: str, request: int) -> EvaluationRequest:
    written = store.read_json(experiment, f"{REQUEST}-{int(request)}")
    return EvaluationRequest(int(written["request"]), str(written["cohort"]), int(written["round"]),
                             tuple(written["models"]), int(written["threshold"]))


def remove_request(store: FederationStore, experiment: str, request: int) -> None:
    (store.experiment_dir(experiment) / f"{REQUEST}-{int(request)}.json").unlink(missing_ok=True)


# -- federated_evaluation --------------------------------------------------------------------------

def model_name(experiment: str, round_: int) -> str:
    return f"{experiment}:{GLOBAL}@round{round_}"


def evaluation_rows(experiment: str, round_: int, evaluations: Sequence[ModelEvaluation]) -> list[dict[str, Any]]:
    """`federated_evaluations` rows: one per site, label and metric (row_digest over content)."""
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for evaluation in evaluations:
        for s in evaluation.summaries:
            row: dict[str, Any] = {
                "experiment": experiment, "model": model_name(experiment, round_), "round": round_,
                "site": evaluation.site, "cohort": evaluation.cohort, "cohort_version": evaluation.cohort_version,
                "label": s.label, "metric": str(s.metric), "cases": s.cases, "reported": s.reported,
                **{k: getattr(s, k) for k in STATISTICS}, "suppressed": s.suppressed}
            rows.append({**row, "row_digest": row_digest(row), "evaluated_at": now})
    return rows


def box_plot_png(evaluation: ModelEvaluation, title: str = "",
                 metrics: Sequence[Metric] = tuple(METRIC_TITLES)) -> bytes:
    """One panel per metric, one box per label, drawn from the site's summaries alone
    (matplotlib's `bxp`); a suppressed label is an empty slot marked with the marker."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(s.label for s in evaluation.summaries))
    figure = Figure(figsize=(3.2 * len(metrics), 3.4), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axis, metric in zip(axes, metrics, strict=True):
        summaries = [evaluation.summary(label, metric) for label in labels]
        shown = [(i, s) for i, s in enumerate(summaries, start=1) if s is not None and not s.suppressed]
        if shown:
            axis.bxp([s.bxp_stats() for _, s in shown], positions=[i for i, _ in shown], showmeans=True,
                     showfliers=False)
        for position, s in enumerate(summaries, start=1):
            if s is not None and s.suppressed:
                axis.annotate(f"{s.reported} cases", (position, 0.5), xycoords=("data", "axes fraction"),
                              ha="center", fontsize=8, color="gray")
        axis.set_xticks(range(1, len(labels) + 1), labels)
        axis.set_xlim(0.5, len(labels) + 0.5)
        axis.set_title(METRIC_TITLES[metric], fontsize=10)
        if metric is Metric.DICE:
            axis.set_ylim(-0.02, 1.02)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(title or f"{evaluation.model} model at {evaluation.site}: {evaluation.cohort} "
                    f"v{evaluation.cohort_version}", fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# -- cross_site_evaluation -------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One model on one site's data: the mean of a metric over the site's cases (None when
    suppressed or not measured)."""

    data_site: str
    model_owner: str
    label: str
    metric: Metric
    value: float | None
    cases: int | None
    reported: str

    @property
    def suppressed(self) -> bool:
        return self.cases is None


def cells(evaluations: Sequence[ModelEvaluation]) -> list[Cell]:
    return [Cell(e.site, e.model, s.label, s.metric, s.mean, s.cases, s.reported)
            for e in evaluations for s in e.summaries]


def matrix_rows(experiment: str, matrix: Sequence[Cell]) -> list[dict[str, Any]]:
    """`cross_site_evaluations` rows."""
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for c in matrix:
        row: dict[str, Any] = {"experiment": experiment, "data_site": c.data_site, "model_owner": c.model_owner,
                               "label": c.label, "metric": str(c.metric), "value": c.value, "cases": c.cases,
                               "reported": c.reported, "suppressed": c.suppressed}
        rows.append({**row, "row_digest": row_digest(row), "evaluated_at": now})
    return rows


def metric_key(label: str, metric: Metric) -> str:
    return f"{metric}_{label}"


def cross_val_results(matrix: Sequence[Cell]) -> dict[str, dict[str, dict[str, float | None]]]:
    """NVIDIA FLARE's `cross_val_results.json` layout: {data_site: {model_owner: {metric: value}}};
    a suppressed cell is null."""
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    for c in matrix:
        results.setdefault(c.data_site, {}).setdefault(c.model_owner, {})[metric_key(c.label, c.metric)] = c.value
    return results


@dataclass(frozen=True)
class SiteVerdict:
    """At one site, on its own data: the global model against the site's own local model."""

    site: str
    global_value: float | None
    own_value: float | None
    reason: str = ""  # why there is no comparison ("" when there is)

    @property
    def global_not_worse(self) -> bool | None:
        if self.global_value is None or self.own_value is None:
            return None
        return self.global_value >= self.own_value

    def line(self, label: str, metric: Metric = MATRIX_METRIC) -> str:
        if self.global_not_worse is None:
            return f"{self.site}: no comparison ({self.reason})"
        assert self.global_value is not None and self.own_value is not None
        verdict = "global at least as good" if self.global_not_worse else "GLOBAL WORSE than the site's own model"
        return (f"{self.site}: global {self.global_value:.3f} vs own {self.own_value:.3f} "
                f"({METRIC_TITLES.get(metric, str(metric))} of {label}) — {verdict}")


def verdicts(matrix: Sequence[Cell], sites: Sequence[str], label: str,
             metric: Metric = MATRIX_METRIC) -> list[SiteVerdict]:
    """The question cross-site evaluation answers: per site, the global model vs the site's own."""
    by_key = {(c.data_site, c.model_owner): c for c in matrix if c.label == label and c.metric == metric}
    out = []
    for site in sites:
        own, global_ = by_key.get((site, site)), by_key.get((site, GLOBAL))
        reason = ""
        if own is None:
            reason = "no local model of its own (the site did not consent, or its baseline failed)"
        elif global_ is None:
            reason = "the global model was not evaluated there"
        elif own.suppressed or global_.suppressed:
            reason = f"{own.reported if own.suppressed else global_.reported} held-out cases: suppressed"
        out.append(SiteVerdict(site, global_.value if global_ else None, own.value if own else None, reason))
    return out


def heat_map_png(matrix: Sequence[Cell], label: str, metric: Metric = MATRIX_METRIC, title: str = "") -> bytes:
    """Rows: data sites; columns: model owners (the sites' local models, then global)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import numpy as np
    from matplotlib.figure import Figure

    chosen = [c for c in matrix if c.label == label and c.metric == metric]
    rows = sorted({c.data_site for c in chosen})
    columns = sorted({c.model_owner for c in chosen} - {GLOBAL}) + ([GLOBAL] if any(
        c.model_owner == GLOBAL for c in chosen) else [])
    values = np.full((len(rows), len(columns)), np.nan)
    text: dict[tuple[int, int], str] = {}
    for c in chosen:
        i, j = rows.index(c.data_site), columns.index(c.model_owner)
        values[i, j] = math.nan if c.value is None else c.value
        text[i, j] = f"{c.reported} cases" if c.suppressed else f"{c.value:.3f}" if c.value is not None else "–"
    figure = Figure(figsize=(1.4 * len(columns) + 2.4, 0.7 * len(rows) + 1.8), dpi=100, layout="constrained")
    axis = figure.subplots()
    dice = metric is Metric.DICE
    image = axis.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0 if dice else None,
                        vmax=1.0 if dice else None)
    for (i, j), label_text in text.items():
        axis.text(j, i, label_text, ha="center", va="center", fontsize=9, color="white" if values[i, j] < 0.6 else "black")
    axis.set_xticks(range(len(columns)), [f"{c} model" for c in columns], rotation=20)
    axis.set_yticks(range(len(rows)), [f"{r} data" for r in rows])
    figure.colorbar(image, ax=axis, label=f"{METRIC_TITLES.get(metric, str(metric))} of {label}")
    axis.set_title(title or "cross-site evaluation (mean over each site's held-out cases)", fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


@dataclass
class CrossSiteAnswer:
    """What cross_site_evaluation prints and returns."""

    label: str
    verdicts: list[SiteVerdict] = field(default_factory=list)

    @property
    def worse(self) -> list[str]:
        """Sites where the global model is worse than the site's own model on the site's data."""
        return [v.site for v in self.verdicts if v.global_not_worse is False]

    def text(self) -> str:
        return "\n".join(v.line(self.label) for v in self.verdicts)


def answer(matrix: Sequence[Cell], sites: Sequence[str], label: str) -> CrossSiteAnswer:
    return CrossSiteAnswer(label, verdicts(matrix, sites, label))


__all__ = ["REQUEST", "Cell", "CrossSiteAnswer", "EvaluationRequest", "SiteVerdict", "answer", "box_plot_png",
           "cells", "cross_val_results", "evaluation_rows", "heat_map_png", "matrix_rows", "model_name", "new_request_id",
           "read_request", "remove_request", "verdicts", "write_request"]
