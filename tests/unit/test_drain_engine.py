"""The HTTP/1.1 engine while the process drains (``control/lifecycle.py``): a connection ends only
after an answer that said ``Connection: close``, until idle ones are closed for good."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.dataplane.client import ClientConnection, Request
from tests.unit.test_http1_engine import Harness


def answer_as_forwarding_does(gate: asyncio.Event | None = None) -> Any:
    """Decides Connection: close when the answer starts, as forwarding does; with ``gate``
    the decision is taken, then the body waits for it."""

    async def handler(conn: ClientConnection, request: Request) -> None:
        close = not request.keep_alive or conn.listener.shutting_down
        conn.response_started = True
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n")
        conn.write(b"Connection: close\r\n\r\n" if close else b"\r\n")
        if gate is not None:
            await gate.wait()
        conn.write(b"ok")
        if close:
            request.keep_alive = False

    return handler


GET = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


async def test_an_idle_connection_stays_open_when_the_drain_begins_and_its_next_answer_closes():
    h = Harness(answer_as_forwarding_does())
    h.feed(GET)
    await h.settle()
    h.listener.shutting_down = True  # SIGTERM: the process drains
    await h.settle()
    assert not h.transport.closed  # a request may already be on the wire
    h.feed(GET)
    await h.settle()
    [first, second] = h.responses()
    assert "connection" not in first[1]
    assert second[1]["connection"] == "close"
    assert h.transport.closed


async def test_an_answer_begun_before_the_drain_keeps_its_connection():
    gate = asyncio.Event()
    h = Harness(answer_as_forwarding_does(gate))
    h.feed(GET)
    await h.settle()
    h.listener.shutting_down = True  # the head went out without Connection: close
    gate.set()
    await h.settle()
    [(status, headers, _)] = h.responses()
    assert status == 200 and "connection" not in headers
    assert not h.transport.closed  # the client was told nothing: closing now could lose
    h.feed(GET)  # the request it sends next is answered, with a close
    await h.settle()
    assert h.responses()[1][1]["connection"] == "close"
    assert h.transport.closed


async def test_once_idle_connections_are_closed_an_answer_ends_its_connection():
    gate = asyncio.Event()
    h = Harness(answer_as_forwarding_does(gate))
    h.feed(GET)
    await h.settle()
    h.listener.shutting_down = True
    h.listener.closing_idle = True  # drain_time is over: listeners closed
    gate.set()
    await h.settle()
    assert h.transport.closed
