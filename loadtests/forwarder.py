"""The featureless forwarder: the yardstick `make bench` and `make bench-instr` measure against.

What any asyncio reverse proxy in Python has to do and nothing more: uvloop, asyncio
Protocols, httptools parsing both directions, a keep-alive pool to one origin, bodies
streamed with backpressure and re-framed (Content-Length kept, chunked otherwise). No
routing, limits, breakers, retries, metrics or access log. The gap between it and
Sluicegate is what the features cost; the gap between it and nginx is what Python costs.

    python loadtests/forwarder.py --listen 127.0.0.1:8000 --origin 127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal

import httptools

HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
     b"transfer-encoding", b"upgrade", b"content-length")
)  # fmt: skip


class Pool:
    """Idle keep-alive connections to the origin, reused last-in first-out."""

    def __init__(self, host: str, port: int, size: int = 128) -> None:
        self.host, self.port, self.size = host, port, size
        self.idle: list[OriginSide] = []

    def checkout(self, client: ClientSide) -> None:
        while self.idle:
            origin = self.idle.pop()
            if not origin.closed:
                origin.start(client)
                return
        loop = asyncio.get_running_loop()
        task = loop.create_task(
            loop.create_connection(lambda: OriginSide(self), self.host, self.port)
        )
        task.add_done_callback(lambda t: self._connected(t, client))

    def _connected(self, task: asyncio.Task, client: ClientSide) -> None:
        if task.exception() is not None:
            client.fail()
            return
        task.result()[1].start(client)

    def release(self, origin: OriginSide) -> None:
        if len(self.idle) < self.size and not origin.closed:
            self.idle.append(origin)
        else:
            origin.transport.close()


class ClientSide(asyncio.Protocol):
    """One client connection: parse a request, hand it to an origin connection, relay."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.origin: OriginSide | None = None
        self.pending: list[bytes] = []  # what arrived before the origin connection did
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.chunked = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.origin is not None:
            self.origin.abort()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.headers = []
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.keep_alive = parser.should_keep_alive()
        length = None
        lines = [parser.get_method() + b" " + self.url + b" HTTP/1.1\r\n"]
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length":
                length = value
            elif lowered == b"transfer-encoding":
                self.chunked = True
            if lowered not in HOP_BY_HOP:
                lines.append(name + b": " + value + b"\r\n")
        if length is not None:
            lines.append(b"Content-Length: " + length + b"\r\n")
        elif self.chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        lines.append(b"\r\n")
        self.pending = [b"".join(lines)]
        self.transport.pause_reading()  # one request at a time: bounded memory
        self.pool.checkout(self)

    def on_body(self, body: bytes) -> None:
        if self.chunked:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        if self.origin is None:
            self.pending.append(body)
        else:
            self.origin.transport.write(body)

    def on_message_complete(self) -> None:
        if self.chunked:
            self.on_body_end()

    def on_body_end(self) -> None:
        end = b"0\r\n\r\n"
        if self.origin is None:
            self.pending.append(end)
        else:
            self.origin.transport.write(end)
        self.chunked = False

    # origin side events
    def attach(self, origin: OriginSide) -> None:
        self.origin = origin
        origin.transport.write(b"".join(self.pending))
        self.pending = []
        self.transport.resume_reading()  # the body streams on

    def response_done(self) -> None:
        origin, self.origin = self.origin, None
        self.pool.release(origin)
        if not self.keep_alive:
            self.transport.close()

    def fail(self) -> None:
        self.transport.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        self.transport.close()

    def pause_writing(self) -> None:
        if self.origin is not None:
            self.origin.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.origin is not None:
            self.origin.transport.resume_reading()


class OriginSide(asyncio.Protocol):
    """One keep-alive connection to the origin: parse its response, relay it."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: ClientSide | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def start(self, client: ClientSide) -> None:
        self.client = client
        client.attach(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.client is not None:
            self.client.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.transport.resume_reading()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        length = None
        lines = [b"HTTP/1.1 %d \r\n" % parser.get_status_code()]
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length":
                length = value
            if lowered not in HOP_BY_HOP:
                lines.append(name + b": " + value + b"\r\n")
        if length is not None:
            lines.append(b"Content-Length: " + length + b"\r\n\r\n")
            self.chunked = False
        else:
            lines.append(b"Transfer-Encoding: chunked\r\n\r\n")
            self.chunked = True
        self.client.transport.write(b"".join(lines))

    def on_body(self, body: bytes) -> None:
        if self.chunked:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        self.client.transport.write(body)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        if self.chunked:
            client.transport.write(b"0\r\n\r\n")
        client.response_done()


async def serve(listen: tuple[str, int], origin: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    pool = Pool(*origin)
    server = await loop.create_server(
        lambda: ClientSide(pool), *listen, backlog=4096, reuse_port=True
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True)
    parser.add_argument("--origin", type=_address, required=True)
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    args = parser.parse_args()
    # Children of one process (SO_REUSEPORT spreads connections), so one process tree
    # holds all the CPU time a benchmark reads.
    for _ in range(args.workers - 1):
        if os.fork() == 0:
            break
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(serve(args.listen, args.origin))


if __name__ == "__main__":
    main()
