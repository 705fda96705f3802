"""WADO-RS routes."""

from __future__ import annotations

from starlette.routing import BaseRoute

from kaapana_assets.dicomweb.config import DicomwebConfig


def routes(config: DicomwebConfig) -> list[BaseRoute]:
    return []
