"""The DICOMweb service as one ASGI app: QIDO-RS, WADO-RS and STOW-RS under DICOMWEB_ROOT,
the OHIF viewer at the root when its build is present."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Mount

from kaapana_assets.dicomweb import qido, stow, wado
from kaapana_assets.dicomweb.config import DICOMWEB_ROOT, DicomwebConfig


def create_app(config: DicomwebConfig) -> Starlette:
    routes = [*qido.routes(config), *wado.routes(config)]
    if config.stow:
        routes += stow.routes(config)
    return Starlette(routes=[Mount(DICOMWEB_ROOT, routes=routes)])
