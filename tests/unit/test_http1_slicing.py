"""The client engine feeding llhttp in slices (heads, bodies, chunked framing walked ahead):
pipelined requests of every framing, cut into reads at random places, must parse the same
as in one read, and an over-long chunk-size line must be refused wherever the cuts fall."""

from __future__ import annotations

import asyncio
import itertools
import random
from types import SimpleNamespace
from typing import Any

import pytest

from proxy.dataplane.client import ClientConnection, Request
from tests.unit.test_http1_engine import FakeTransport


class Transport(FakeTransport):
    """The engine test's transport, which also names the local address (an HTTP/1.0
    request without Host is given the address it reached)."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default


class Listener:
    scheme = b"http"
    shutting_down = False
    closing_idle = False

    def __init__(self) -> None:
        self.limits = SimpleNamespace(
            max_header_bytes=16 * 1024,
            max_body_bytes=10 * 1024 * 1024,
            client_header_timeout=10.0,
            client_body_timeout=30.0,
            keepalive_timeout=75.0,
            max_connections=100,
        )
        self.served: list[tuple[bytes, bytes]] = []
        self.rejections: list[tuple[int, str]] = []

    async def _serve(self, conn: ClientConnection, request: Request) -> None:
        body = b""
        if request.body is not None:
            await request.body.buffer_up_to(1 << 40)
            body = b"".join(request.body.chunks)
        self.served.append((request.path, body))
        conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    def handler(self, conn: ClientConnection, request: Request) -> Any:
        return self._serve(conn, request)

    def connection_opened(self, conn: ClientConnection) -> None:
        pass

    def connection_closed(self, conn: ClientConnection) -> None:
        pass

    def new_request_id(self) -> bytes:
        return b"rid"

    def record_rejection(self, conn: Any, request: Any, status: int, reason: str, **_: Any):
        self.rejections.append((status, reason))

    def log_exception(self, message: str) -> None:
        raise AssertionError(message)


async def serve(wire: bytes, cuts: list[int]) -> Listener:
    listener = Listener()
    conn = ClientConnection(listener)
    transport = Transport()
    transport.protocol = conn
    conn.connection_made(transport)
    bounds = sorted({0, len(wire), *(c for c in cuts if 0 < c < len(wire))})
    for low, high in itertools.pairwise(bounds):
        for _ in range(100):  # a paused transport delivers nothing until resumed
            if transport.reading or transport.closed:
                break
            await asyncio.sleep(0)
        if transport.closed or not transport.reading:
            break
        conn.data_received(wire[low:high])
        await asyncio.sleep(0)  # let the handlers run, as the loop would between reads
    for _ in range(20):
        await asyncio.sleep(0)
    return listener


def chunked(path: bytes, chunks: list[bytes], extension: bytes = b"", trailers: bytes = b""):
    framed = b"".join(b"%x%b\r\n%b\r\n" % (len(c), extension, c) for c in chunks)
    return b"POST %b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n%b0\r\n%b\r\n" % (
        path,
        framed,
        trailers,
    )


def with_length(path: bytes, body: bytes) -> bytes:
    return b"POST %b HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%b" % (path, len(body), body)


def get(path: bytes) -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: h\r\n\r\n" % path


def pipeline(rng: random.Random) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A random pipeline whose bodies hold CRLFCRLF, fake heads and fake chunk lines."""
    wire, expected = b"", []
    tricky = b"\r\n\r\nGET /fake HTTP/1.1\r\nTransfer-Encoding: cHuNkEd\r\n\r\n5;x\r\n\r\n0\r\n\r\n"
    for index in range(rng.randint(1, 6)):
        path = b"/r%d" % index
        kind = rng.choice(["get", "length", "chunked"])
        if kind == "get":
            wire += get(path)
            expected.append((path, b""))
        elif kind == "length":
            body = tricky * rng.randint(0, 3) + rng.randbytes(rng.randint(0, 3000))
            wire += with_length(path, body)
            expected.append((path, body))
        else:
            chunks = [tricky + rng.randbytes(rng.randint(1, 2000)) for _ in range(3)]
            extension = b";e=" + b"x" * rng.choice([0, 10, 4000])
            trailers = rng.choice([b"", b"X-Sum: 1\r\n"])
            wire += chunked(path, chunks, extension, trailers)
            expected.append((path, b"".join(chunks)))
    return wire, expected


@pytest.mark.parametrize("seed", range(40))
async def test_any_cuts_parse_like_one_read(seed):
    rng = random.Random(seed)
    wire, expected = pipeline(rng)
    cuts = [rng.randrange(len(wire)) for _ in range(rng.randint(0, 12))]
    if seed % 4 == 0:
        cuts = list(range(0, len(wire), rng.randint(1, 7)))  # tiny reads
    listener = await serve(wire, cuts)
    assert listener.rejections == []
    assert listener.served == expected


@pytest.mark.parametrize("seed", range(20))
async def test_an_over_long_line_is_refused_wherever_the_cuts_fall(seed):
    rng = random.Random(seed)
    before, served = pipeline(rng)
    bad = chunked(b"/bad", [b"hello", b"world"], b";e=" + b"x" * 4094)  # 4097 with the size
    wire = before + bad + get(b"/after")
    cuts = [rng.randrange(len(wire)) for _ in range(rng.randint(0, 12))]
    listener = await serve(wire, cuts)
    assert listener.rejections == [(400, "chunk-size line longer than 4096 bytes")]
    assert listener.served == served  # those before it answered, nothing after it
