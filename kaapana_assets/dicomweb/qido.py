"""QIDO-RS routes (PS3.18 10.6): study, series and instance searches, at every level of the
hierarchy and across it, answered from the index by `search`."""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from kaapana_assets.access.audit import Action
from kaapana_assets.dicomweb.access import audit, project_scope
from kaapana_assets.dicomweb.config import DicomwebConfig
from kaapana_assets.dicomweb.http import DICOM_JSON, JSON, negotiate, require_uid
from kaapana_assets.dicomweb.search import Index, Level, NotFound, QueryError, Scope, parse_query, search

# application/dicom+xml (the other media type PS3.18 defines for QIDO) is not offered: 406.
OFFERED = (DICOM_JSON, JSON)


def routes(config: DicomwebConfig) -> list[BaseRoute]:
    index = Index(config.lake)

    def endpoint(level: Level) -> Callable[[Request], Response]:
        def handle(request: Request) -> Response:
            media_type = negotiate(request, OFFERED)
            study_uid = request.path_params.get("study")
            series_uid = request.path_params.get("series")
            scope = Scope(study_uid and require_uid(study_uid, "StudyInstanceUID"),
                          series_uid and require_uid(series_uid, "SeriesInstanceUID"))
            try:
                query = parse_query(request.query_params.multi_items(), level)
                found = search(index, level, query, scope, str(request.base_url), project_scope(request))
            except QueryError as exc:
                raise HTTPException(400, str(exc)) from None
            except NotFound as exc:
                raise HTTPException(404, str(exc)) from None
            audit(config.audit, request, Action.SEARCH, scope.study_uid, scope.series_uid)
            headers = {}
            if query.ignored_fields:
                # PS3.18 8.3.4.3: say which requested attributes are not returned.
                headers["Warning"] = (f'299 kaapana "includefield {",".join(query.ignored_fields)}: '
                                      'not held by the index, not returned"')
            return Response(found, media_type=media_type, headers=headers)

        return handle

    return [
        Route("/studies", endpoint(Level.STUDY), methods=["GET"]),
        Route("/series", endpoint(Level.SERIES), methods=["GET"]),
        Route("/instances", endpoint(Level.INSTANCE), methods=["GET"]),
        Route("/studies/{study}/series", endpoint(Level.SERIES), methods=["GET"]),
        Route("/studies/{study}/instances", endpoint(Level.INSTANCE), methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances", endpoint(Level.INSTANCE), methods=["GET"]),
    ]
