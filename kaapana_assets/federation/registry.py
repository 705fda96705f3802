"""The steps the transport carries, by name. One Flower run performs one step: the hub's
handler runs in the ServerApp (`hub`), and each kind of request it sends is answered at a
site by the handler registered for that kind (`site`).

Domains register their steps when their step module is imported (federated training: `plan`
and `round`; the network monitor: `statistics`). The transport looks steps up here and
imports none of them: kaapana_assets/flower_apps.py, the module Flower loads in the ServerApp
and ClientApp processes, imports the step modules."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from kaapana_assets.federation.channel import Kind

if TYPE_CHECKING:
    from flwr.app import Message

    from kaapana_assets.federation.clientapp import SiteSettings
    from kaapana_assets.federation.serverapp import HubRun

HubHandler = Callable[["HubRun"], dict]  # the run's result: {"ok": bool, ...}, left for the asset
SiteHandler = Callable[["SiteSettings", "Message"], "Message"]  # the signed reply

# What only the transport sends or answers: a step never registers these.
RESERVED = frozenset({Kind.IDENTIFY, Kind.IDENTITY})


@dataclass(frozen=True)
class Step:
    name: str
    hub: HubHandler
    site: Mapping[Kind, SiteHandler] = field(default_factory=dict)  # request kind → the site's answer
    numbered: bool = False  # the run's `round` is a round of the experiment (said in the hub's log)
    # What the site handlers import when they run: kaapana-superexec imports it ahead (warm_superexec.py).
    preload: tuple[str, ...] = ()


_steps: dict[str, Step] = {}
_site: dict[Kind, SiteHandler] = {}


def register_step(step: Step) -> Step:
    """Make `step` known to the ServerApp and the ClientApp. Registering the same step again
    is a no-op; another step under a taken name, or for a kind another step answers, is an error."""
    known = _steps.get(step.name)
    if known is not None and known != step:
        raise ValueError(f"step {step.name!r} is already registered")
    for kind, handler in step.site.items():
        if kind in RESERVED:
            raise ValueError(f"step {step.name!r} may not answer {kind} messages: the transport does")
        if _site.get(kind, handler) != handler:
            raise ValueError(f"step {step.name!r}: {kind} requests are already answered by another step")
    _steps[step.name] = step
    _site.update(step.site)
    return step


def hub_step(name: str) -> Step | None:
    return _steps.get(name)


def site_handler(kind: str) -> SiteHandler | None:
    try:
        return _site.get(Kind(kind))
    except ValueError:  # not a kind of this channel
        return None


def steps() -> Mapping[str, Step]:
    return MappingProxyType(_steps)


def site_preloads() -> tuple[str, ...]:
    """Every registered step's `preload`, in order of registration, each module once."""
    return tuple(dict.fromkeys(name for step in _steps.values() for name in step.preload))


__all__ = ["HubHandler", "SiteHandler", "Step", "hub_step", "register_step", "site_handler", "site_preloads",
           "steps"]
