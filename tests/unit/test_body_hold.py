"""``RequestBody.buffer_then``: the callback form of holding a body for replay, as the
pipeline's ``BODY`` phase uses it. The listener hears once, never from inside the parser,
whether the body is held in full, larger than the limit, or lost with its client."""

from __future__ import annotations

from proxy.dataplane.client import ClientConnection, Request
from tests.unit.test_http1_engine import Harness


class Listener:
    def __init__(self, conn: ClientConnection, request: Request) -> None:
        self.conn = conn
        self.request = request
        self.heard: list[object] = []

    def body_held(self, complete: bool) -> None:
        assert not self.conn._pumping, "told from inside the parser"
        self.heard.append(complete)
        body = self.request.body
        self.conn.respond(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % body.buffered)
        self.conn.request_done(self.request)

    def body_lost(self, error: Exception) -> None:
        self.heard.append(error)


def harness(limit: int) -> tuple[Harness, list[Listener]]:
    listeners: list[Listener] = []

    def handler(conn: ClientConnection, request: Request) -> None:
        listener = Listener(conn, request)
        listeners.append(listener)
        request.body.buffer_then(limit, listener)

    return Harness(handler), listeners


async def test_a_body_arriving_in_pieces_is_held_in_full():
    h, listeners = harness(limit=100)
    h.feed(b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhello")
    await h.settle()
    assert listeners[0].heard == []
    h.feed(b"world")
    await h.settle()
    assert listeners[0].heard == [True]
    assert b"".join(listeners[0].request.body.chunks) == b"helloworld"
    [(status, headers, _)] = h.responses()
    assert (status, headers["content-length"]) == (200, "10")


async def test_a_body_that_came_with_its_head_is_held_at_once():
    h, listeners = harness(limit=100)
    h.feed(b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok")
    await h.settle()
    assert listeners[0].heard == [True]


async def test_a_body_larger_than_the_limit_is_not_replayable():
    h, listeners = harness(limit=4)
    h.feed(b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhello")
    await h.settle()
    assert listeners[0].heard == [False]  # more than 4 held, the rest still to come


async def test_a_client_gone_mid_body_is_heard_as_lost():
    h, listeners = harness(limit=100)
    h.feed(b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhel")
    await h.settle()
    h.conn.connection_lost(ConnectionResetError())
    await h.settle()
    [lost] = listeners[0].heard
    assert isinstance(lost, ConnectionResetError)
