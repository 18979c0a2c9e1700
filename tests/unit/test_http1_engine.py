"""The client-side HTTP/1.1 engine fed raw bytes, without the daemon.

A fake transport records what the engine writes and whether it paused reading or closed;
a fake listener supplies the limits and a handler coroutine that answers each request
(the real one is ``forwarding.handle``). Deadlines run on an injected clock and a sweeper
the test drives (``Harness.elapse``): timeouts fire at once, with no real wait.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from proxy.dataplane.client import BODY_HIGH_WATER, ClientConnection, Request
from proxy.dataplane.timers import Sweeper
from tests.support.clock import FakeClock


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True
        self.protocol: ClientConnection | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.1.2.3", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()


def limits(**overrides: Any) -> SimpleNamespace:
    values = {
        "max_header_bytes": 16 * 1024,
        "max_body_bytes": 10 * 1024 * 1024,
        "client_header_timeout": 10.0,
        "client_body_timeout": 30.0,
        "keepalive_timeout": 75.0,
        "max_connections": 100,
    }
    values.update(overrides)
    return SimpleNamespace(**values)


class FakeListener:
    scheme = b"http"
    shutting_down = False
    closing_idle = False

    def __init__(self, handler: Any, **limit_overrides: Any) -> None:
        self.limits = limits(**limit_overrides)
        self.handler = handler
        self.runtime = None
        self.rejections: list[tuple[int, str]] = []
        self.rejection_details: list[dict[str, Any]] = []
        self.opened = 0
        self.closed = 0
        self._ids = 0

    def connection_opened(self, conn: ClientConnection) -> None:
        self.opened += 1

    def connection_closed(self, conn: ClientConnection) -> None:
        self.closed += 1

    def new_request_id(self) -> bytes:
        self._ids += 1
        return b"rid-%d" % self._ids

    def record_rejection(
        self, conn: Any, request: Any, status: int, reason: str, **details: Any
    ) -> None:
        self.rejections.append((status, reason))
        self.rejection_details.append(details)

    def log_exception(self, message: str) -> None:
        raise AssertionError(message)


async def echo_handler(conn: ClientConnection, request: Request) -> None:
    """Answers with a JSON description of the request (reads the body first)."""
    body = b""
    if request.body is not None:
        await request.body.buffer_up_to(1 << 40)
        body = b"".join(request.body.chunks)
    payload = json.dumps(
        {
            "method": request.method.decode(),
            "target": request.target.decode("latin-1"),
            "path": request.path.decode("latin-1"),
            "host": request.host.decode() if request.host else None,
            "version": request.version,
            "body": body.decode("latin-1"),
            "headers": [[n.decode(), v.decode()] for n, v in request.headers],
        }
    ).encode()
    conn.response_started = True
    close = b"Connection: close\r\n" if not request.keep_alive else b""
    conn.write(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(payload), close, payload)
    )


class Harness:
    def __init__(self, handler: Any = echo_handler, **limit_overrides: Any) -> None:
        self.listener = FakeListener(handler, **limit_overrides)
        self.transport = FakeTransport()
        self.clock = FakeClock()
        # Never started: time passes, and deadlines are swept, only in elapse().
        self.sweeper = Sweeper(asyncio.get_running_loop(), clock=self.clock)
        self.conn = ClientConnection(self.listener, self.sweeper)
        self.transport.protocol = self.conn
        self.conn.connection_made(self.transport)

    def feed(self, data: bytes) -> None:
        self.conn.data_received(data)

    async def settle(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def elapse(self, seconds: float) -> None:
        """Let ``seconds`` pass on the engine's clock, sweep its deadlines, and settle."""
        self.clock.advance(seconds)
        self.sweeper.sweep()
        await self.settle()

    def responses(self) -> list[tuple[int, dict[str, str], bytes]]:
        return parse_responses(bytes(self.transport.written))


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete head: {data!r}"
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.decode().lower()] = value.strip().decode()
        length = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


# -- parsing and keep-alive --------------------------------------------------------------------


async def test_simple_get_parsed():
    h = Harness()
    h.feed(b"GET /a/b?x=%2F&y HTTP/1.1\r\nHost: Example.com\r\nX-One: 1\r\n\r\n")
    await h.settle()
    [(status, _, body)] = h.responses()
    assert status == 200
    seen = json.loads(body)
    assert seen["method"] == "GET"
    assert seen["target"] == "/a/b?x=%2F&y"
    assert seen["path"] == "/a/b"
    assert seen["host"] == "Example.com"
    assert ["X-One", "1"] in seen["headers"]
    assert not h.transport.closed
    assert h.conn.idle


async def test_head_split_across_many_writes():
    h = Harness()
    for byte in b"GET /split HTTP/1.1\r\nHost: h\r\n\r\n":
        h.feed(bytes([byte]))
    await h.settle()
    [(status, _, body)] = h.responses()
    assert status == 200 and json.loads(body)["path"] == "/split"


async def test_keep_alive_serves_several_requests():
    h = Harness()
    for i in range(3):
        h.feed(b"GET /r%d HTTP/1.1\r\nHost: h\r\n\r\n" % i)
        await h.settle()
    assert [json.loads(b)["path"] for _, _, b in h.responses()] == ["/r0", "/r1", "/r2"]
    assert not h.transport.closed
    assert h.conn.requests_served == 3


@pytest.mark.parametrize("bad_host", [b"a b", b"", b"user@h"])
@pytest.mark.parametrize("good_before", [0, 2])
async def test_host_checked_on_every_request_of_a_connection(bad_host: bytes, good_before: int):
    # The connection remembers the last Host it found valid: any other one is checked,
    # the first request's included.
    h = Harness()
    for _ in range(good_before):
        h.feed(b"GET /ok HTTP/1.1\r\nHost: h\r\n\r\n")
        await h.settle()
    h.feed(b"GET /bad HTTP/1.1\r\nHost: " + bad_host + b"\r\n\r\n")
    await h.settle()
    assert [status for status, _, _ in h.responses()] == [200] * good_before + [400]
    assert h.transport.closed


async def test_pipelined_requests_answered_in_order():
    first_may_answer = asyncio.Event()

    async def handler(conn: ClientConnection, request: Request) -> None:
        if request.path == b"/slow1":
            await first_may_answer.wait()
        await echo_handler(conn, request)

    h = Harness(handler)
    h.feed(
        b"GET /slow1 HTTP/1.1\r\nHost: h\r\n\r\n"
        b"POST /fast2 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /fast3 HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    # while the first is in flight, the others wait and reading pauses
    await h.settle()
    assert not h.transport.reading
    assert h.responses() == []
    first_may_answer.set()
    await h.settle()
    got = [json.loads(b) for _, _, b in h.responses()]
    assert [g["path"] for g in got] == ["/slow1", "/fast2", "/fast3"]
    assert got[1]["body"] == "abc"
    assert h.transport.reading
    assert not h.transport.closed


async def test_http10_without_keep_alive_closes_after_response():
    h = Harness()
    h.feed(b"GET /old HTTP/1.0\r\n\r\n")
    await h.settle()
    [(status, _, body)] = h.responses()
    assert status == 200 and json.loads(body)["version"] == "1.0"
    assert h.transport.closed


async def test_connection_close_request_closes_and_ignores_what_follows():
    h = Harness()
    h.feed(
        b"GET /one HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        b"GET /two HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    await h.settle()
    assert [json.loads(b)["path"] for _, _, b in h.responses()] == ["/one"]
    assert h.transport.closed


async def test_chunked_request_body_is_decoded():
    h = Harness()
    h.feed(
        b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n5;ext=1\r\ndefgh\r\n0\r\nTrailer-X: 1\r\n\r\n"
    )
    await h.settle()
    [(_, _, body)] = h.responses()
    assert json.loads(body)["body"] == "abcdefgh"
    h.feed(b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n")
    await h.settle()
    assert json.loads(h.responses()[1][2])["path"] == "/after"


async def test_large_buffered_body_pauses_reading():
    bodies = []
    may_read = asyncio.Event()

    async def handler(conn: ClientConnection, request: Request) -> None:
        await may_read.wait()  # not reading the body yet
        bodies.append(request.body.received)
        conn.response_started = True
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    h = Harness(handler)
    size = BODY_HIGH_WATER * 2
    h.feed(b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size)
    h.feed(b"x" * BODY_HIGH_WATER)
    assert not h.transport.reading  # held bytes reached the high-water mark
    may_read.set()
    await h.settle()
    assert bodies == [BODY_HIGH_WATER]


async def test_absolute_form_for_the_same_host_is_accepted():
    h = Harness()
    h.feed(b"GET http://h.example/p?q=1 HTTP/1.1\r\nHost: h.example\r\n\r\n")
    await h.settle()
    [(status, _, body)] = h.responses()
    assert status == 200
    assert json.loads(body)["target"] == "/p?q=1"


async def test_options_asterisk():
    h = Harness()
    h.feed(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")
    await h.settle()
    [(status, _, body)] = h.responses()
    assert status == 200 and json.loads(body)["path"] == "*"


async def test_expect_continue_is_recorded():
    seen = []

    async def handler(conn: ClientConnection, request: Request) -> None:
        seen.append(request.expect_continue)
        conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await request.body.buffer_up_to(100)
        conn.response_started = True
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    h = Harness(handler)
    h.feed(b"PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    await h.settle()
    assert seen == [True]
    assert bytes(h.transport.written) == b"HTTP/1.1 100 Continue\r\n\r\n"
    h.feed(b"ok")
    await h.settle()
    assert bytes(h.transport.written).endswith(b"200 OK\r\nContent-Length: 0\r\n\r\n")


# -- rejections: answered by the engine, then closed -------------------------------------------


def rejected(h: Harness) -> tuple[int, dict[str, Any]]:
    [(status, headers, body)] = h.responses()
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    payload = json.loads(body)
    assert set(payload) == {"error", "request_id"}
    assert headers["x-request-id"] == payload["request_id"]
    return status, payload


BAD_REQUESTS = [
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, id="http11-without-host"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, id="two-hosts"),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        id="cl-and-te",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        400,
        id="two-different-cl",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400, id="negative-cl"
    ),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n", 400, id="bad-cl"),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400, id="te-not-chunked"
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        400,
        id="te-chunked-not-final",
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400, id="obs-fold"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: 1\r\n\r\n", 400, id="space-in-name"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400, id="nul-in-value"),
    pytest.param(b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="connect"),
    pytest.param(
        b"GET http://evil.example/ HTTP/1.1\r\nHost: good.example\r\n\r\n", 400, id="foreign-abs"
    ),
    pytest.param(b"GET nowhere HTTP/1.1\r\nHost: a\r\n\r\n", 400, id="bad-target"),
    pytest.param(b"GARBAGE\r\n\r\n", 400, id="garbage"),
]


@pytest.mark.parametrize(("raw", "status"), BAD_REQUESTS)
async def test_bad_requests_are_answered_and_closed(raw: bytes, status: int):
    handled = []

    async def handler(conn: ClientConnection, request: Request) -> None:
        handled.append(request)

    h = Harness(handler)
    h.feed(raw)
    await h.settle()
    assert rejected(h)[0] == status
    assert h.transport.closed
    assert handled == []
    assert h.listener.rejections and h.listener.rejections[0][0] == status


async def test_bad_chunk_size_in_a_streamed_body_gives_400():
    async def handler(conn: ClientConnection, request: Request) -> None:
        await request.body.buffer_up_to(1 << 20)

    h = Harness(handler)
    h.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    await h.settle()
    assert rejected(h)[0] == 400
    assert h.transport.closed


async def test_head_too_large_gives_431():
    h = Harness(max_header_bytes=1024)
    h.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 2000 + b"\r\n\r\n")
    await h.settle()
    assert rejected(h)[0] == 431
    assert h.transport.closed


async def test_unfinished_huge_head_gives_431_without_waiting_for_its_end():
    h = Harness(max_header_bytes=1024)
    h.feed(b"GET / HTTP/1.1\r\nHost: a\r\n")
    for _ in range(10):
        h.feed(b"X-Filler: " + b"v" * 200 + b"\r\n")
    await h.settle()
    assert rejected(h)[0] == 431


async def test_too_many_headers_gives_431():
    h = Harness()
    h.feed(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-H: 1\r\n" * 150 + b"\r\n")
    await h.settle()
    assert rejected(h)[0] == 431


async def test_declared_body_too_large_gives_413_before_reading_it():
    h = Harness(max_body_bytes=100)
    h.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 101\r\n\r\n")
    await h.settle()
    assert rejected(h)[0] == 413
    assert h.transport.closed


async def test_chunked_body_growing_too_large_gives_413():
    async def handler(conn: ClientConnection, request: Request) -> None:
        await request.body.buffer_up_to(1 << 30)

    h = Harness(handler, max_body_bytes=100)
    h.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    h.feed(b"40\r\n" + b"x" * 64 + b"\r\n")
    h.feed(b"40\r\n" + b"x" * 64 + b"\r\n")
    await h.settle()
    assert rejected(h)[0] == 413
    assert h.transport.closed


async def test_rejection_keeps_the_clients_request_id():
    h = Harness()
    h.feed(b"GET / HTTP/1.1\r\nX-Request-ID: mine-1\r\n\r\n")
    await h.settle()
    assert rejected(h)[1]["request_id"] == "mine-1"


async def test_bad_second_request_after_a_good_one():
    h = Harness()
    h.feed(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
    await h.settle()
    h.feed(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n")
    await h.settle()
    responses = h.responses()
    assert [r[0] for r in responses] == [200, 400]
    assert h.transport.closed


async def test_handler_exception_gives_500_and_close():
    async def handler(conn: ClientConnection, request: Request) -> None:
        raise RuntimeError("boom")

    h = Harness(handler)
    h.listener.log_exception = lambda message: None  # type: ignore[method-assign]
    h.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    await h.settle()
    assert rejected(h)[0] == 500


async def test_header_timeout_gives_408():
    h = Harness(client_header_timeout=10)
    h.feed(b"GET / HTTP/1.1\r\nHost: a\r\n")
    await h.elapse(9.9)
    assert h.transport.written == b"" and not h.transport.closed
    await h.elapse(0.1)
    assert rejected(h)[0] == 408
    assert h.transport.closed


async def test_idle_connection_closes_silently():
    h = Harness(client_header_timeout=10)
    await h.elapse(9.9)
    assert not h.transport.closed
    await h.elapse(0.1)
    assert h.transport.closed
    assert h.transport.written == b""


async def test_client_going_away_fails_a_waiting_body():
    errors = []

    async def handler(conn: ClientConnection, request: Request) -> None:
        try:
            await request.body.buffer_up_to(1 << 20)
        except ConnectionError as error:
            errors.append(error)

    h = Harness(handler)
    h.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    await h.settle()
    h.conn.connection_lost(None)
    await h.settle()
    assert len(errors) == 1


async def test_slow_head_after_a_kept_alive_request_gives_408():
    h = Harness(client_header_timeout=10)
    h.feed(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
    await h.settle()
    h.feed(b"GET /second HTTP/1.1\r\n")
    await h.elapse(9.9)
    assert len(h.responses()) == 1 and not h.transport.closed
    await h.elapse(0.1)
    assert [r[0] for r in h.responses()] == [200, 408]
    assert h.transport.closed


async def test_stalled_body_gives_408_after_the_body_timeout():
    async def handler(conn: ClientConnection, request: Request) -> None:
        await request.body.buffer_up_to(1 << 20)

    h = Harness(handler, client_body_timeout=30)
    h.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    await h.settle()
    await h.elapse(29.9)
    assert h.transport.written == b"" and not h.transport.closed
    h.feed(b"def")  # progress re-arms the deadline
    await h.elapse(29.9)
    assert not h.transport.closed
    await h.elapse(0.1)
    assert rejected(h)[0] == 408
    assert h.transport.closed
