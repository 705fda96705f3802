"""The DICOMweb service as one ASGI app: QIDO-RS, WADO-RS and STOW-RS under DICOMWEB_ROOT,
the OHIF viewer at the root when its build is present."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, ExitStack, asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount

from kaapana_assets.access.scopes import ScopeCache
from kaapana_assets.dicomweb import qido, stow, viewer, wado
from kaapana_assets.dicomweb.access import IdentityMiddleware
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
    middleware = []
    if config.identity_secret is not None:
        middleware.append(Middleware(IdentityMiddleware, secret=config.identity_secret, scopes=ScopeCache(config.lake)))
    return Starlette(routes=app_routes, middleware=middleware, lifespan=_lifespan(storing, config))


def _lifespan(storing: stow.Stow | None, config: DicomwebConfig) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """STOW-RS holds its receive journal segment from start to shutdown (a last checkpoint
    then makes every stored instance durable in the spool); the audit log appends what is
    left at shutdown."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        with ExitStack() as stack:
            if storing is not None:
                stack.enter_context(storing.opened())
            if config.audit is not None:
                stack.enter_context(config.audit.running())
            yield

    return lifespan
