"""Scripted upstream servers on an in-memory network, and the loop that connects to them.

``FakeNetwork`` answers the proxy's ``loop.create_connection(factory, host, port)``: the
address names a ``FakeUpstream``, which may refuse the connect, hang it, or delay it on the
virtual clock; otherwise a ``FakeTransport`` pair joins the proxy's ``UpstreamConnection``
to a ``FakeServerConnection``. That one parses requests with httptools and runs the
upstream's script (``handler(request, conn)``, sync or async) once per request, as soon as
the request head is in: the script answers through ``conn`` with whatever bytes, pieces,
pauses (``asyncio.sleep`` is virtual), closes or resets the test needs, and may wait for
the body (``await request.complete()``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import httptools

from tests.pipeline.transports import FakeTransport
from tests.pipeline.virtualtime import VirtualClockLoop

PROXY_ADDRESS = "10.0.0.1"  # where the proxy's upstream connections come from


class ReceivedRequest:
    """One request as an upstream read it."""

    def __init__(self, conn: FakeServerConnection, method: str, target: str, version: str):
        self.conn = conn
        self.method = method
        self.target = target
        self.version = version
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.done = False
        self._complete = asyncio.Event()

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        lowered = name.lower()
        return next((v for n, v in self.headers if n.lower() == lowered), None)

    def header_values(self, name: str) -> list[str]:
        lowered = name.lower()
        return [v for n, v in self.headers if n.lower() == lowered]

    async def complete(self) -> bytes:
        """The whole body, once it has arrived."""
        await self._complete.wait()
        return self.body

    def _finish(self) -> None:
        self.done = True
        self._complete.set()


Handler = Callable[[ReceivedRequest, "FakeServerConnection"], Awaitable[None] | None]


def response_bytes(
    status: int,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    *,
    reason: str = "",
    length: bool = True,
) -> bytes:
    """A response head (and body); ``Content-Length`` added unless ``length`` is false or
    the headers frame the body already."""
    headers = list(headers or [])
    names = {name.lower() for name, _ in headers}
    if length and "content-length" not in names and "transfer-encoding" not in names:
        headers.append(("Content-Length", str(len(body))))
    lines = [f"HTTP/1.1 {status} {reason or 'Whatever'}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


async def answer_ok(request: ReceivedRequest, conn: FakeServerConnection) -> None:
    """The default script: reads the body, answers 200 naming the upstream and the path."""
    await request.complete()
    conn.respond(200, f"{conn.upstream.name} {request.method} {request.target}".encode())


class FakeServerConnection(asyncio.Protocol):
    """The upstream's end of one connection from the proxy."""

    def __init__(self, upstream: FakeUpstream, index: int) -> None:
        self.upstream = upstream
        self.index = index  # this upstream's connections are numbered from 0
        self.transport: FakeTransport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._current: ReceivedRequest | None = None
        self.requests: list[ReceivedRequest] = []
        self.upgraded = False
        self.tunnel_received = bytearray()
        self._tunnel_grew = asyncio.Event()
        self.closed = False
        self.reset_by_peer = False
        self.eof = False

    # -- the script's side -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def respond(
        self,
        status: int,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        *,
        reason: str = "",
    ) -> None:
        self.write(response_bytes(status, body, headers, reason=reason))

    def close(self) -> None:
        assert self.transport is not None
        self.transport.close()

    def reset(self) -> None:
        assert self.transport is not None
        self.transport.abort()

    def pause_reading(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    async def tunnel_bytes(self, count: int) -> bytes:
        """Once ``count`` bytes came through the tunnel: take them."""
        while len(self.tunnel_received) < count:
            self._tunnel_grew.clear()
            await self._tunnel_grew.wait()
        taken = bytes(self.tunnel_received[:count])
        del self.tunnel_received[:count]
        return taken

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            self._tunnel(data)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded = True
            offset = upgrade.args[0] if upgrade.args else len(data)
            self._tunnel(data[offset:])

    def eof_received(self) -> bool | None:
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reset_by_peer = isinstance(exc, ConnectionResetError)

    def _tunnel(self, data: bytes) -> None:
        if data:
            self.tunnel_received += data
            self._tunnel_grew.set()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url = url

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers: list[tuple[str, str]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        request = ReceivedRequest(
            self,
            parser.get_method().decode(),
            self._url.decode("latin-1"),
            parser.get_http_version(),
        )
        request.headers = self._headers
        self._current = request
        self.requests.append(request)
        self.upstream.received(request)

    def on_body(self, body: bytes) -> None:
        assert self._current is not None
        self._current.body += body

    def on_message_complete(self) -> None:
        assert self._current is not None
        self._current._finish()


class FakeUpstream:
    """One upstream server's address on the fake network, and its script.

    ``refuse``: connects fail with ECONNREFUSED. ``hang_connect``: connects never complete
    (the proxy's connect timeout ends them). ``connect_delay``: virtual seconds a connect
    takes.
    """

    def __init__(self, name: str, host: str, port: int, handler: Handler = answer_ok) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.handler = handler
        self.refuse = False
        self.hang_connect = False
        self.connect_delay = 0.0
        self.connects = 0  # attempts, refused ones included
        self.connections: list[FakeServerConnection] = []
        self.requests: list[ReceivedRequest] = []
        self.errors: list[BaseException] = []  # raised by the script: failed tests
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def open_connections(self) -> list[FakeServerConnection]:
        return [conn for conn in self.connections if not conn.closed]

    def received(self, request: ReceivedRequest) -> None:
        self.requests.append(request)
        outcome = self.handler(request, request.conn)
        if outcome is not None:
            task = asyncio.ensure_future(outcome)
            self._tasks.add(task)
            task.add_done_callback(self._script_ended)

    def _script_ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(task.exception())  # type: ignore[arg-type]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for conn in self.connections:
            if conn.transport is not None and not conn.closed:
                conn.transport.abort()


class FakeNetwork:
    """Addresses -> fake upstreams; connects to any other address are refused."""

    def __init__(self) -> None:
        self.upstreams: dict[tuple[str, int], FakeUpstream] = {}
        self._ports = itertools.count(50000)

    def add(self, upstream: FakeUpstream) -> FakeUpstream:
        self.upstreams[upstream.host, upstream.port] = upstream
        return upstream

    async def connect(self, protocol_factory: Callable[[], Any], host: str, port: int) -> Any:
        upstream = self.upstreams.get((host, port))
        if upstream is not None:
            upstream.connects += 1
        if upstream is None or upstream.refuse:
            raise ConnectionRefusedError(111, "Connection refused")
        if upstream.connect_delay:
            await asyncio.sleep(upstream.connect_delay)
        if upstream.hang_connect:
            await asyncio.get_running_loop().create_future()
        ours, theirs = FakeTransport.pair((PROXY_ADDRESS, next(self._ports)), (host, port))
        server_conn = FakeServerConnection(upstream, len(upstream.connections))
        upstream.connections.append(server_conn)
        theirs.connect(server_conn)
        protocol = protocol_factory()
        ours.connect(protocol)
        return ours, protocol

    def stop(self) -> None:
        for upstream in self.upstreams.values():
            upstream.stop()


class PipelineLoop(VirtualClockLoop):
    """The virtual-clock loop whose outgoing connections go to ``network``."""

    def __init__(self) -> None:
        super().__init__()
        self.network = FakeNetwork()

    async def create_connection(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], Any],
        host: str | None = None,
        port: int | None = None,
        **_: Any,
    ) -> Any:
        assert host is not None and port is not None
        return await self.network.connect(protocol_factory, host, port)
