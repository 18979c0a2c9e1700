"""Pipelining, one request at a time: the engine reads the next request only once the
current response is on its way (handed to the transport, and the write buffer under its
low-water mark), so a deep pipeline costs one parsed request and a bounded backlog.

Driven with the fake transport and listener of ``test_http1_engine``; the handler here
holds each request until the test lets it answer.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from proxy.dataplane.client import ClientConnection, Deadline, Request
from tests.unit.test_http1_engine import Harness, echo_handler


class Gate:
    """A handler that records each request as it starts and answers when released."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release = asyncio.Event()

    async def __call__(self, conn: ClientConnection, request: Request) -> None:
        self.started.append(request.path.decode())
        if request.path.startswith(b"/hold"):
            await self.release.wait()
        await echo_handler(conn, request)


def paths(h: Harness) -> list[str]:
    return [json.loads(body)["path"] for _, _, body in h.responses()]


def get(path: str, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: h\r\n%b\r\n" % (path.encode(), extra)


async def test_a_pipeline_is_parsed_one_request_at_a_time():
    gate = Gate()
    h = Harness(gate)
    h.feed(get("/hold") + b"".join(get(f"/r{i}") for i in range(50)))
    await h.settle()
    # Only the request in flight was parsed: the others wait as bytes, reading paused.
    assert gate.started == ["/hold"]
    assert not h.conn._queue
    assert not h.transport.reading
    gate.release.set()
    await h.settle(200)
    assert paths(h) == ["/hold"] + [f"/r{i}" for i in range(50)]
    assert h.transport.reading
    assert not h.transport.closed


async def test_the_next_request_waits_until_the_client_reads():
    """A response handed over while the write buffer is over its high-water mark: the next
    request starts only when the transport says the buffer fell under its low-water mark."""
    gate = Gate()
    h = Harness(gate)
    h.conn.pause_writing()  # the client stopped reading
    h.feed(get("/a") + get("/b") + get("/c"))
    await h.settle()
    assert gate.started == ["/a"]
    assert paths(h) == ["/a"]
    h.conn.resume_writing()  # drained
    await h.settle()
    assert gate.started == ["/a", "/b", "/c"]
    assert paths(h) == ["/a", "/b", "/c"]


async def test_a_head_already_received_is_served_without_more_bytes():
    """Nothing more comes from the client: the buffered request must not wait for a read."""
    gate = Gate()
    h = Harness(gate)
    h.feed(get("/hold") + get("/second"))
    await h.settle()
    gate.release.set()
    await h.settle()
    assert paths(h) == ["/hold", "/second"]


async def test_bodies_between_pipelined_requests_stay_in_step():
    gate = Gate()
    h = Harness(gate)
    h.feed(
        get("/hold")
        + b"POST /cl HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhello\r\n\r\nx"
        + b"POST /ch HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"4\r\n\r\n\r\n\r\n3;e=1\r\nabc\r\n0\r\nT: 1\r\n\r\n"
        + get("/last")
    )
    await h.settle()
    assert gate.started == ["/hold"]
    gate.release.set()
    await h.settle(200)
    got = [json.loads(body) for _, _, body in h.responses()]
    assert [g["path"] for g in got] == ["/hold", "/cl", "/ch", "/last"]
    assert got[1]["body"] == "hello\r\n\r\nx"
    assert got[2]["body"] == "\r\n\r\nabc"


async def test_a_head_whose_end_straddles_two_reads_does_not_pull_in_the_next():
    gate = Gate()
    h = Harness(gate)
    h.feed(b"GET /hold HTTP/1.1\r\nHost: h\r\n\r")  # the last "\n" comes with the next read
    h.feed(b"\n" + get("/next") + get("/after"))
    await h.settle()
    assert gate.started == ["/hold"]
    assert not h.conn._queue
    gate.release.set()
    await h.settle(100)
    assert paths(h) == ["/hold", "/next", "/after"]


async def test_the_header_timeout_of_a_pipelined_head_counts_from_the_previous_response():
    gate = Gate()
    h = Harness(gate, client_header_timeout=5.0)
    h.feed(get("/hold") + b"GET /partial HTTP/1.1\r\nHost:")
    await h.settle()
    assert h.conn._deadline_kind is Deadline.BUSY  # answering: no header clock runs
    h.conn._sweeper.refresh()
    gate.release.set()
    await h.settle()
    assert paths(h) == ["/hold"]
    conn: Any = h.conn
    assert conn._deadline_kind is Deadline.HEAD
    answered_at = conn._head_started_at
    assert answered_at >= conn._sweeper.now - 0.1
    assert conn.deadline == answered_at + 5.0
    h.feed(b" h\r\n\r\n")
    await h.settle()
    assert paths(h) == ["/hold", "/partial"]


async def test_requests_answered_at_once_leave_an_idle_connection_idle():
    """A pipeline of requests answered without waiting (a 404, a 429) ends on the
    keep-alive clock, not the header clock of a request that has already completed."""

    async def at_once(conn: ClientConnection, request: Request) -> None:
        await echo_handler(conn, request)

    def sync_handler(conn: ClientConnection, request: Request) -> None:
        conn.response_started = True
        conn.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        conn.request_done(request)

    h = Harness(sync_handler, keepalive_timeout=75.0, client_header_timeout=5.0)
    h.feed(get("/x") + get("/y"))
    await h.settle()
    assert [status for status, _, _ in h.responses()] == [404, 404]
    assert h.conn._deadline_kind is Deadline.IDLE
    assert h.conn.deadline == h.conn._head_started_at + 75.0
