"""The DICOMweb service as one ASGI app: QIDO-RS, WADO-RS and STOW-RS under DICOMWEB_ROOT,
the OHIF viewer at the root when its build is present."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount

from kaapana_assets.dicomweb import qido, stow, viewer, wado
from kaapana_assets.dicomweb.config import DICOMWEB_ROOT, DicomwebConfig


def create_app(config: DicomwebConfig) -> Starlette:
    routes = [*qido.routes(config), *wado.routes(config)]
    storing = stow.Stow(config) if config.stow else None
    if storing is not None:
        routes += stow.routes(config, storing)
    app_routes: list[BaseRoute] = [Mount(DICOMWEB_ROOT, routes=routes)]
    if config.viewer_dir is not None:
        # After the DICOMweb mount: the viewer's catch-all never answers for /dicom-web.
        app_routes += viewer.routes(config.viewer_dir, DICOMWEB_ROOT)
    return Starlette(routes=app_routes, lifespan=_lifespan(storing))


def _lifespan(storing: stow.Stow | None) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """STOW-RS holds its receive journal segment from start to shutdown (a last checkpoint
    then makes every stored instance durable in the spool)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if storing is None:
            yield
            return
        with storing.opened():
            yield

    return lifespan
