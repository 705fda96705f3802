"""multipart/related bodies (RFC 2387) as DICOMweb uses them: written as a stream of parts
(WADO-RS), read part by part from a stream (STOW-RS)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MULTIPART = "multipart/related"
CHUNK = 2**20  # files are streamed in 1 MiB reads


def new_boundary() -> str:
    return uuid.uuid4().hex


def content_type(part_type: str, boundary: str, transfer_syntax: str | None = None) -> str:
    ts = f"; transfer-syntax={transfer_syntax}" if transfer_syntax else ""
    return f'{MULTIPART}; type="{part_type}"; boundary={boundary}{ts}'


def file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            yield chunk


@dataclass(frozen=True)
class Part:
    content_type: str  # of this part, with its transfer-syntax parameter where it has one
    chunks: Iterable[bytes]  # produced when the part is sent: a file is read only then


def stream(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    """The body, one part after another; each part's bytes produced only when it is sent."""
    for part in parts:
        yield f"--{boundary}\r\nContent-Type: {part.content_type}\r\n\r\n".encode("ascii")
        yield from part.chunks
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


class BodyTooLarge(ValueError):
    pass


class MalformedBody(ValueError):
    pass


@dataclass(frozen=True)
class ReceivedPart:
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise MalformedBody(f"a part header line without a colon: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


async def read_parts(chunks: AsyncIterator[bytes], boundary: str, max_body: int, max_part: int
                     ) -> AsyncIterator[ReceivedPart]:
    """The parts of a streamed body, each yielded as soon as it is complete. At most one part
    (≤ `max_part` bytes) and the next chunk are held; beyond `max_body` bytes in all, or a part
    beyond `max_part`, BodyTooLarge."""
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    buffer = bytearray(b"\r\n")  # the first delimiter may open the body without a CRLF before it
    received = 0
    searched = 0  # where the next search for a delimiter starts (nothing before it matches)
    started = False  # the first delimiter seen (what precedes it is the preamble, ignored)
    done = False
    async for chunk in chunks:
        received += len(chunk)
        if received > max_body:
            raise BodyTooLarge(f"the body exceeds {max_body} bytes")
        if done:
            continue  # the epilogue is read and ignored
        buffer += chunk
        while not done:
            at = buffer.find(delimiter, searched)
            if at < 0:
                searched = max(0, len(buffer) - len(delimiter))
                if started and len(buffer) > max_part + len(delimiter):
                    raise BodyTooLarge(f"a part exceeds {max_part} bytes")
                break
            after = at + len(delimiter)
            if len(buffer) < after + 2:
                searched = at
                break  # the delimiter's tail ("--" or CRLF) not here yet
            closing = buffer[after:after + 2] == b"--"
            if closing:
                line_end = after + 2
            else:
                newline = buffer.find(b"\r\n", after)  # after transport padding, if any
                if newline < 0:
                    searched = at
                    break
                line_end = newline + 2
            if started:
                yield _part(bytes(buffer[:at]))
            started, done = True, closing
            del buffer[:line_end]
            searched = 0
    if not done:
        raise MalformedBody("the body ends before its closing boundary")


def _part(raw: bytes) -> ReceivedPart:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        if raw.startswith(b"\r\n"):  # no headers at all
            return ReceivedPart({}, raw[2:])
        raise MalformedBody("a part without the blank line that ends its headers")
    return ReceivedPart(_parse_headers(head), body)
