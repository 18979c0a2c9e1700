"""``ConnectionPool.connect_then``: the callback form of ``connect`` the pipeline's
``CONNECT`` phase uses. The listener hears ``connected(conn)`` or ``connect_failed(error)``
(an ``UpstreamError`` with its retry word), on a later loop turn."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

from proxy.balancing.retry import FailureKind
from proxy.dataplane.upstream import ConnectionPool, UpstreamConnection, UpstreamError


def pool(port: int) -> ConnectionPool:
    server = SimpleNamespace(host="127.0.0.1", port=port, scheme="http")
    upstream = SimpleNamespace(keepalive=4, timeouts=SimpleNamespace(connect=2.0, read=2.0))
    return ConnectionPool(server, upstream)


class Listener:
    def __init__(self) -> None:
        self.done = asyncio.get_running_loop().create_future()
        self.inside_call = False

    def connected(self, conn: UpstreamConnection) -> None:
        assert not self.inside_call, "told from inside connect_then"
        self.done.set_result(conn)

    def connect_failed(self, error: UpstreamError) -> None:
        assert not self.inside_call, "told from inside connect_then"
        self.done.set_result(error)

    def connect_crashed(self, error: BaseException) -> None:
        self.done.set_exception(error)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_connection_is_handed_to_the_listener():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    listener = Listener()
    listener.inside_call = True
    pool(port).connect_then(10.0, listener)
    listener.inside_call = False
    conn = await asyncio.wait_for(listener.done, 5)
    assert isinstance(conn, UpstreamConnection) and not conn.closed
    conn.close()
    server.close()
    await server.wait_closed()


async def test_a_refused_connect_is_an_error_word_before_anything_was_sent():
    listener = Listener()
    pool(closed_port()).connect_then(10.0, listener)
    error = await asyncio.wait_for(listener.done, 5)
    assert isinstance(error, UpstreamError)
    assert (error.kind, error.sent, error.budget_spent) == (FailureKind.ERROR, False, False)


async def test_no_budget_left_is_a_timeout_that_spends_the_exchange():
    listener = Listener()
    pool(closed_port()).connect_then(0.0, listener)
    error = await asyncio.wait_for(listener.done, 5)
    assert (error.kind, error.budget_spent) == (FailureKind.TIMEOUT, True)
