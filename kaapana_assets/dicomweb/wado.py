"""WADO-RS routes (PS3.18 10.4): instances, metadata, frames, bulk data, rendered images.

- Retrieve (`/studies/{study}[/series/{series}[/instances/{instance}]]`): multipart/related;
  type="application/dicom", one Part 10 file per part, streamed from the archive in 1 MiB
  reads (one instance in memory only when it is transcoded). `transfer-syntax=*` gives every
  file as stored; a named syntax gives the files stored in it as they are, and the others
  converted to it where `pixels.py` can (only Explicit VR Little Endian, from the native
  syntaxes and every compressed one pydicom decodes); no Accept transfer syntax means
  Explicit VR Little Endian (PS3.18 8.7.3.5.2). A request that some instance cannot be given
  in gets 406 before anything is sent.
- Metadata (`…/metadata`): application/dicom+json, every attribute of every instance; PixelData
  and binary values over 1 KiB as a BulkDataURI to `…/instances/{instance}/bulk/{tag path}`.
  Cached per series for the index version (`metadata.py` reads the headers).
- Frames (`…/instances/{instance}/frames/{n[,m…]}`): multipart/related; uncompressed frames as
  application/octet-stream (Explicit VR Little Endian's bytes), encapsulated frames as stored
  (`image/jpeg`, `image/jls`, `image/jp2`, `image/jphc`, `image/dicom-rle`... with their
  transfer-syntax), or decoded to octet-stream when that is what the Accept asks for;
  `type="application/octet-stream"; transfer-syntax=*` gives the stored bytes with the
  stored syntax named (what OHIF asks for). A frame out of range: 404.
- Rendered and thumbnail (series: its middle instance; instance: its first frame; frames:
  `…/frames/{n}/rendered`): image/jpeg (the default) or image/png, windowed by the
  instance's first window or the frame's min/max; `viewport=w,h` bounds the size
  (thumbnails: 128 px unless given).
- Unknown UIDs: 404 (from the index, never from the files); malformed UIDs, frame lists and
  parameters: 400; an Accept we cannot satisfy: 406."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pydicom.uid import ExplicitVRLittleEndian
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from kaapana_assets.access.audit import Action
from kaapana_assets.dicomweb import multipart, pixels
from kaapana_assets.dicomweb.access import audit, project_scope
from kaapana_assets.dicomweb.config import DICOMWEB_ROOT, DicomwebConfig
from kaapana_assets.dicomweb.http import DICOM_JSON, JSON, MediaRange, accepted, negotiate, require_uid
from kaapana_assets.dicomweb.index import ArchivedInstance, InstanceIndex, Selection
from kaapana_assets.dicomweb.metadata import PIXEL_DATA, instance_json, read_header

DICOM = "application/dicom"
MULTIPART = "multipart/related"
ANY_SYNTAX = "*"
THUMBNAIL_PX = 128
CACHED_SERIES = 64  # metadata of this many series kept (a 300-slice CT series: ≈1 MB)


# --- transfer syntax negotiation ----------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """How one instance (or frame) is sent: as stored, or converted."""

    convert: bool
    content_type: str  # of its part


def _multipart_ranges(request: Request, default_part: str) -> list[tuple[str, str | None]]:
    """(part media type, transfer syntax or None) of every acceptable multipart/related range,
    best first; `*/*` counts as multipart/related of any part type."""
    out = []
    for media_range in accepted(request):
        if media_range.q <= 0:
            continue
        if media_range.media_type in ("*/*", "multipart/*", MULTIPART):
            part_type = media_range.params.get("type", default_part if media_range.media_type == MULTIPART else "*/*")
            out.append((part_type.lower(), media_range.params.get("transfer-syntax")))
    return out


def _instance_delivery(stored: str, part_type: str, syntax: str | None) -> Delivery | None:
    if not MediaRange(part_type).matches(DICOM):
        return None
    if syntax == ANY_SYNTAX or syntax == stored:
        return Delivery(False, f"{DICOM}; transfer-syntax={stored}")
    wanted = syntax or ExplicitVRLittleEndian
    if wanted == ExplicitVRLittleEndian and pixels.can_give_explicit_le(stored):
        return Delivery(True, f"{DICOM}; transfer-syntax={ExplicitVRLittleEndian}")
    return None


def _instance_deliveries(request: Request, instances: list[ArchivedInstance]) -> list[Delivery]:
    ranges = _multipart_ranges(request, DICOM)
    for part_type, syntax in ranges:
        deliveries = [_instance_delivery(i.transfer_syntax_uid, part_type, syntax) for i in instances]
        if all(d is not None for d in deliveries):
            return [d for d in deliveries if d is not None]
    raise HTTPException(406, f"Accept {request.headers.get('accept')!r}: not every instance can be given in it "
                             f"(stored as {', '.join(sorted({i.transfer_syntax_uid for i in instances}))}; we "
                             f"give them as stored or as Explicit VR Little Endian)")


def _frame_delivery(stored: str, part_type: str, syntax: str | None) -> Delivery | None:
    encapsulated = pixels.is_encapsulated(stored)
    stored_media = pixels.FRAME_MEDIA_TYPES.get(stored, pixels.OCTET_STREAM) if encapsulated else pixels.OCTET_STREAM
    octet = MediaRange(part_type).matches(pixels.OCTET_STREAM)
    if part_type == pixels.OCTET_STREAM and syntax == ANY_SYNTAX:
        return Delivery(False, f"{pixels.OCTET_STREAM}; transfer-syntax={stored if encapsulated else ExplicitVRLittleEndian}")
    if not encapsulated:
        if octet and syntax in (None, ANY_SYNTAX, ExplicitVRLittleEndian):
            return Delivery(False, f"{pixels.OCTET_STREAM}; transfer-syntax={ExplicitVRLittleEndian}")
        return None
    if MediaRange(part_type).matches(stored_media) and syntax in (None, ANY_SYNTAX, stored) and part_type != pixels.OCTET_STREAM:
        return Delivery(False, f"{stored_media}; transfer-syntax={stored}")
    if octet and syntax in (None, ExplicitVRLittleEndian) and pixels.decodable(stored):
        return Delivery(True, f"{pixels.OCTET_STREAM}; transfer-syntax={ExplicitVRLittleEndian}")
    return None


def _frame_deliveries(request: Request, stored: str) -> Delivery:
    for part_type, syntax in _multipart_ranges(request, pixels.OCTET_STREAM):
        delivery = _frame_delivery(stored, part_type, syntax)
        if delivery is not None:
            return delivery
    raise HTTPException(406, f"Accept {request.headers.get('accept')!r}: frames are stored as {stored}; we give "
                             "them as stored or uncompressed (application/octet-stream)")


# --- the service ------------------------------------------------------------------------


def _uid(request: Request, name: str, what: str) -> str:
    return require_uid(str(request.path_params[name]), what)


def _selection(request: Request) -> Selection:
    params = request.path_params
    return Selection(_uid(request, "study", "StudyInstanceUID"),
                     _uid(request, "series", "SeriesInstanceUID") if "series" in params else None,
                     _uid(request, "instance", "SOPInstanceUID") if "instance" in params else None)


def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",")]
    except ValueError:
        raise HTTPException(400, f"frame list {text[:80]!r}: not comma-separated numbers") from None
    if not numbers or any(n < 1 for n in numbers):
        raise HTTPException(400, f"frame list {text[:80]!r}: frame numbers start at 1")
    return numbers


def base_url(request: Request) -> str:
    """The service's DICOMweb root as the client reached it, for the URLs we answer with.
    Some clients (dicomweb-client) send a Host header without the port: when that host is the
    address the connection came in on (no proxy in between), the port is the server's."""
    url = request.base_url
    server = request.scope.get("server")
    if url.port is None and server and server[0] == url.hostname and server[1] not in (80, 443):
        url = url.replace(port=server[1])
    return str(url).rstrip("/").removesuffix(DICOMWEB_ROOT) + DICOMWEB_ROOT


def _multipart_response(parts: Iterable[multipart.Part], part_type: str) -> StreamingResponse:
    boundary = multipart.new_boundary()
    return StreamingResponse(multipart.stream(parts, boundary),
                             media_type=multipart.content_type(part_type, boundary))


def _multipart_in_memory(parts: list[multipart.Part], part_type: str) -> Response:
    """A multipart body already in memory (frames, bulk values): one send, no stream."""
    boundary = multipart.new_boundary()
    return Response(b"".join(multipart.stream(parts, boundary)), media_type=multipart.content_type(part_type, boundary))


class Wado:
    def __init__(self, config: DicomwebConfig) -> None:
        self.config = config
        self.index = InstanceIndex(config.lake, config.archive)
        self._metadata_lock = threading.Lock()
        # (base URL, study, series) → (index version, each instance's DICOM JSON, encoded)
        self._metadata: OrderedDict[tuple[str, str, str], tuple[int | None, list[bytes]]] = OrderedDict()

    def _find(self, request: Request, selection: Selection | None = None) -> list[ArchivedInstance]:
        """The instances a request selects, of the reader's projects only (404, as if absent,
        when none is: whether a study exists is not for others to learn); audited."""
        selection = _selection(request) if selection is None else selection
        allowed = project_scope(request)
        found = [i for i in self.index.find(selection) if allowed.allows_series(i.series_uid)]
        if not found:
            raise HTTPException(404, f"no {selection.describe()} in the archive")
        audit(self.config.audit, request, Action.RETRIEVE, selection.study_uid, selection.series_uid,
              selection.sop_instance_uid)
        return found

    # retrieve ------------------------------------------------------------------------------

    def retrieve(self, request: Request) -> Response:
        instances = self._find(request)
        deliveries = _instance_deliveries(request, instances)

        def parts() -> Iterator[multipart.Part]:
            for instance, delivery in zip(instances, deliveries, strict=True):
                chunks: Iterable[bytes] = ((pixels.explicit_le_bytes(instance.path),) if delivery.convert
                                           else multipart.file_chunks(instance.path))
                yield multipart.Part(delivery.content_type, chunks)

        return _multipart_response(parts(), DICOM)

    # metadata ------------------------------------------------------------------------------

    def metadata(self, request: Request) -> Response:
        media_type = negotiate(request, [DICOM_JSON, JSON])
        selection = _selection(request)
        instances = self._find(request, selection)
        base = base_url(request)
        encoded: list[bytes] = []
        by_series: dict[str, list[ArchivedInstance]] = {}
        for instance in instances:
            by_series.setdefault(instance.series_uid, []).append(instance)
        for series_uid, members in by_series.items():
            series = self._series_metadata(base, selection.study_uid, series_uid)
            if selection.sop_instance_uid is None:
                encoded += series
            else:
                whole = self.index.find(Selection(selection.study_uid, series_uid))
                position = [i.sop_instance_uid for i in whole].index(members[0].sop_instance_uid)
                encoded.append(series[position])
        return Response(b"[" + b",".join(encoded) + b"]", media_type=media_type)

    def _series_metadata(self, base: str, study_uid: str, series_uid: str) -> list[bytes]:
        version = self.index.version()
        key = (base, study_uid, series_uid)
        with self._metadata_lock:
            cached = self._metadata.get(key)
            if cached is not None and cached[0] == version:
                self._metadata.move_to_end(key)
                return cached[1]
        instances = self.index.find(Selection(study_uid, series_uid))
        encoded = [json.dumps(self._instance_json(base, i), ensure_ascii=False, separators=(",", ":")).encode()
                   for i in instances]
        with self._metadata_lock:
            self._metadata[key] = (version, encoded)
            while len(self._metadata) > CACHED_SERIES:
                self._metadata.popitem(last=False)
        return encoded

    @staticmethod
    def _instance_json(base: str, instance: ArchivedInstance) -> dict:
        url = (f"{base}/studies/{instance.study_uid}/series/{instance.series_uid}"
               f"/instances/{instance.sop_instance_uid}/bulk/")

        def bulk_uri(path: tuple[int, ...]) -> str:
            # tags (8 hex digits) and item indices (decimal) alternate along the path
            return url + "/".join(f"{p:08X}" if position % 2 == 0 else str(p) for position, p in enumerate(path))

        return instance_json(instance.path, bulk_uri)

    # bulk data -----------------------------------------------------------------------------

    def bulk(self, request: Request) -> Response:
        [instance] = self._find(request)
        segments = [s for s in str(request.path_params["path"]).split("/") if s]
        try:
            path = [int(s, 16) if position % 2 == 0 else int(s) for position, s in enumerate(segments)]
        except ValueError:
            raise HTTPException(400, f"bulk data path {request.path_params['path'][:80]!r}: tags are 8 hex digits, "
                                     "item indices decimal") from None
        if not path or len(path) % 2 == 0:
            raise HTTPException(400, "a bulk data path names an attribute: tag[/item/tag...]")
        if path == [PIXEL_DATA] and pixels.is_encapsulated(instance.transfer_syntax_uid):
            frames = pixels.cached_layout(instance.path).frames  # each frame as stored, one part each
            return self._frames_response(request, instance, list(range(1, frames + 1)))
        if path == [PIXEL_DATA]:
            return _multipart_in_memory([multipart.Part(pixels.OCTET_STREAM, (pixels.native_pixel_data(instance.path),))],
                                        pixels.OCTET_STREAM)
        ds = read_header(instance.path)
        element = None
        try:
            for position in range(0, len(path), 2):
                element = ds[path[position]]
                if position + 1 < len(path):
                    ds = element.value[path[position + 1]]
        except (KeyError, IndexError, TypeError):
            raise HTTPException(404, f"no attribute at {request.path_params['path']} in {instance.sop_instance_uid}") \
                from None
        value = element.value if element is not None else None
        if not isinstance(value, bytes):
            raise HTTPException(404, f"{request.path_params['path']} is not bulk data")
        return _multipart_in_memory([multipart.Part(pixels.OCTET_STREAM, (value,))], pixels.OCTET_STREAM)

    # frames --------------------------------------------------------------------------------

    def frames(self, request: Request) -> Response:
        [instance] = self._find(request)
        return self._frames_response(request, instance, _frame_numbers(str(request.path_params["frames"])))

    def _frames_response(self, request: Request, instance: ArchivedInstance, numbers: list[int]) -> Response:
        delivery = _frame_deliveries(request, instance.transfer_syntax_uid)
        encapsulated = pixels.is_encapsulated(instance.transfer_syntax_uid)
        try:
            if encapsulated and not delivery.convert:
                data = pixels.stored_frames(instance.path, numbers)
            else:
                data = pixels.native_frames(instance.path, numbers)
        except pixels.FrameOutOfRange as exc:
            raise HTTPException(404, str(exc)) from None
        part_type = delivery.content_type.split(";")[0]
        return _multipart_in_memory([multipart.Part(delivery.content_type, (d,)) for d in data], part_type)

    # rendered ------------------------------------------------------------------------------

    def rendered(self, request: Request) -> Response:
        return self._render(request, size=None)

    def thumbnail(self, request: Request) -> Response:
        return self._render(request, size=THUMBNAIL_PX)

    def _render(self, request: Request, size: int | None) -> Response:
        media_type = negotiate(request, ["image/jpeg", "image/png"])
        instances = self._find(request)
        instance = instances[len(instances) // 2]  # a series: its middle instance
        frame = _frame_numbers(str(request.path_params.get("frames", "1")))[0]
        viewport = request.query_params.get("viewport")
        if viewport:
            try:
                size = max(int(v) for v in viewport.split(",")[:2])
            except ValueError:
                raise HTTPException(400, f"viewport {viewport[:40]!r}: width,height in pixels") from None
            if size < 1:
                raise HTTPException(400, "viewport: width and height are at least 1")
        try:
            body = pixels.render(instance.path, frame, media_type, size)
        except pixels.FrameOutOfRange as exc:
            raise HTTPException(404, str(exc)) from None
        return Response(body, media_type=media_type)


def routes(config: DicomwebConfig) -> list[BaseRoute]:
    wado = Wado(config)
    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    return [
        Route(study, wado.retrieve, methods=["GET"]),
        Route(series, wado.retrieve, methods=["GET"]),
        Route(instance, wado.retrieve, methods=["GET"]),
        Route(study + "/metadata", wado.metadata, methods=["GET"]),
        Route(series + "/metadata", wado.metadata, methods=["GET"]),
        Route(instance + "/metadata", wado.metadata, methods=["GET"]),
        Route(instance + "/frames/{frames}", wado.frames, methods=["GET"]),
        Route(instance + "/frames/{frames}/rendered", wado.rendered, methods=["GET"]),
        Route(instance + "/bulk/{path:path}", wado.bulk, methods=["GET"]),
        Route(series + "/rendered", wado.rendered, methods=["GET"]),
        Route(instance + "/rendered", wado.rendered, methods=["GET"]),
        Route(series + "/thumbnail", wado.thumbnail, methods=["GET"]),
        Route(instance + "/thumbnail", wado.thumbnail, methods=["GET"]),
    ]
