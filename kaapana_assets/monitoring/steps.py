"""The network monitor's step on the federation's transport, registered by name (see
kaapana_assets/federation/registry.py): `statistics`, whose run's `round` is the
collection's number (network.new_request_id).

  hub   every site's aggregates, verified; an answer with a small count in the clear is refused
  site  the site's aggregates, computed from its own lake without Dagster, small cells
        suppressed before the reply is signed: with the hub's threshold, but never below the
        site's own floor (SiteSettings.min_cell_size, node config `min-cell-size`)

Imported by kaapana_assets/flower_apps.py only (the ServerApp's and ClientApp's processes)."""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Message, RecordDict

from kaapana_assets.federation.channel import (
    CONFIG,
    Kind,
    Rejection,
    RejectionReason,
    UpdateRejected,
    read_manifest,
    seal,
    verify,
)
from kaapana_assets.federation.clientapp import SiteSettings, reply
from kaapana_assets.federation.guard import DEFAULT_THRESHOLD, MAX_THRESHOLD
from kaapana_assets.federation.registry import Step, register_step
from kaapana_assets.federation.serverapp import HubRun
from kaapana_assets.monitoring.figures import (
    EXPERIMENT,
    STEP,
    AnswerRefused,
    parse_answer,
    site_answer,
)
from kaapana_assets.monitoring.network import read_request
from kaapana_assets.projects.membership import ProjectNameError, project_name


def statistics_step(run: HubRun) -> dict:
    """Every site's aggregates (the site suppresses small cells; the hub refuses an answer
    with a small count in the clear). A short wait and TTL: a site that does not answer is
    reported stale by the asset, and a request must not wait 24 h for a site to return."""
    request = read_request(run.store, run.settings.round)
    threshold, project = request.threshold, request.project
    timeout_s = min(run.settings.timeout_s, request.timeout_s)
    body = json.dumps({"threshold": threshold, **({"project": project} if project is not None else {})},
                      sort_keys=True)
    verified, rejected = run.channel(timeout_s, min(run.settings.ttl_s, timeout_s)).exchange(
        Kind.STATISTICS_REQUEST, Kind.STATISTICS, run.sites, run.settings.round,
        lambda site: RecordDict({CONFIG: ConfigRecord({"request": body})}))
    answers = {}
    for verified_reply in verified:
        assert verified_reply.message is not None
        try:
            answer = parse_answer(str(verified_reply.message.content[CONFIG]["statistics"]), verified_reply.site,
                                  threshold, project)
        except (KeyError, AnswerRefused) as exc:
            rejected.append(Rejection(verified_reply.site, RejectionReason.BAD_PAYLOAD, f"statistics refused: {exc}"))
            continue
        answers[verified_reply.site] = answer.to_json()
    for rejection in rejected:
        run.log(f"statistics of {rejection.site}: {rejection.reason}: {rejection.message}")
    return {"ok": True, "answers": answers, "rejected": [r.to_json() for r in rejected]}


def statistics(settings: SiteSettings, msg: Message) -> Message:
    """The site's aggregates for the hub's network monitor: computed from the site's own
    lake, small cells suppressed here, before the reply is signed (no Dagster run)."""
    manifest, _ = read_manifest(msg.content)
    try:
        verify(msg.content, settings.key, Kind.STATISTICS_REQUEST, EXPERIMENT, manifest.round, settings.site)
    except UpdateRejected as exc:
        raise RuntimeError(f"{settings.site} refuses the hub's statistics request: {exc.reason}: {exc.message}") from None
    request = json.loads(str(msg.content[CONFIG]["request"]))
    requested = request.get("threshold", DEFAULT_THRESHOLD)
    if not isinstance(requested, int) or isinstance(requested, bool) or not 1 <= requested <= MAX_THRESHOLD:
        raise RuntimeError(f"{settings.site} refuses a statistics request with threshold {requested!r}")
    project = request.get("project")
    if project is not None:
        try:
            project = project_name(str(project))
        except ProjectNameError:
            raise RuntimeError(f"{settings.site} refuses a statistics request for project {str(project)[:80]!r}") \
                from None
    answer = site_answer(settings.site_lake(), settings.site, max(requested, settings.min_cell_size),
                         project=project)
    content = RecordDict({CONFIG: ConfigRecord({"statistics": answer.dumps()})})
    # The manifest's case count is 0: a count there would bypass the suppression.
    return reply(msg, seal(content, Kind.STATISTICS, EXPERIMENT, manifest.round, settings.site, 0, settings.key))


STATISTICS = register_step(Step(STEP, hub=statistics_step, site={Kind.STATISTICS_REQUEST: statistics}))

__all__ = ["STATISTICS", "statistics", "statistics_step"]
