"""The DICOMweb service as one ASGI app: QIDO-RS, WADO-RS and STOW-RS under DICOMWEB_ROOT,
the OHIF viewer at the root when its build is present."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import Mount

from kaapana_assets.dicomweb import qido, stow, wado
from kaapana_assets.dicomweb.config import DICOMWEB_ROOT, DicomwebConfig


def create_app(config: DicomwebConfig) -> Starlette:
    routes = [*qido.routes(config), *wado.routes(config)]
    storing = stow.Stow(config) if config.stow else None
    if storing is not None:
        routes += stow.routes(config, storing)
    return Starlette(routes=[Mount(DICOMWEB_ROOT, routes=routes)], lifespan=_lifespan(storing))


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
