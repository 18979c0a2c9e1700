"""The request a client sends, as the pipeline and the cache read it: ``Request`` (its head)
and ``RequestBody`` (its body as it arrives, buffered for a retry or streamed on).

They stay Python classes with ``__slots__``, apart from the compiled connection engine
(dataplane/client.py): the pipeline and cache code that reads their fields many times a
request is interpreted, and reads a slot in a few instructions where an extension type's
field would cost a descriptor call each.
"""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.dataplane.flow import PauseReason

_BODY_PAUSE = PauseReason.BODY
BODY_HIGH_WATER = 256 * 1024


class RequestBody:
    """The request body as it arrives: buffered for replay, or streamed to one consumer."""

    __slots__ = (
        "_conn",
        "_hold_limit",
        "_holder",
        "_waiter",
        "buffered",
        "chunks",
        "complete",
        "consumer",
        "error",
        "received",
    )

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.received = 0
        self.complete = False
        self.consumer: Any = None  # has on_body(chunk) / on_end()
        self._waiter: asyncio.Future[None] | None = None
        self.error: Exception | None = None
        self._holder: Any = None  # hears body_held / body_lost (buffer_then)
        self._hold_limit = 0

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        consumer = self.consumer
        if consumer is not None:
            consumer.on_body(chunk)
            return
        self.chunks.append(chunk)
        self.buffered += len(chunk)
        if self.buffered >= BODY_HIGH_WATER:
            self._conn.pause_reading(_BODY_PAUSE)
        self._wake()

    def finish(self) -> None:
        self.complete = True
        if self.consumer is not None:
            self.consumer.on_end()
        self._wake()

    def fail(self, error: Exception) -> None:
        self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def buffer_up_to(self, limit: int) -> bool:
        """Read until the body is complete (True) or more than ``limit`` bytes are held."""
        conn = self._conn
        while not self.complete and self.error is None:
            if self.buffered > limit:
                return False
            conn.resume_reading(_BODY_PAUSE)
            self._waiter = conn.loop.create_future()
            await self._waiter
            self._waiter = None
        if self.error is not None:
            raise self.error
        return True

    def buffer_then(self, limit: int, listener: Any) -> None:
        """``buffer_up_to`` by callback: ``listener.body_held(complete)`` once the body is
        complete (True) or more than ``limit`` bytes are held (False), or
        ``listener.body_lost(error)``. Told at once when that is known already, else on
        a later loop turn: never from inside the parser's body callbacks (the listener
        may write, finish, even start the next request)."""
        self._holder = listener
        self._hold_limit = limit
        self._hold_step(None)

    def _hold_step(self, _: Any) -> None:
        self._waiter = None
        listener = self._holder
        if self.error is not None:
            self._holder = None
            listener.body_lost(self.error)
        elif self.complete or self.buffered > self._hold_limit:
            self._holder = None
            listener.body_held(self.complete)
        else:
            conn = self._conn
            conn.resume_reading(_BODY_PAUSE)
            self._waiter = waiter = conn.loop.create_future()
            waiter.add_done_callback(self._hold_step)

    def stream_to(self, consumer: Any) -> None:
        """From now on chunks go straight to ``consumer``; held ones first."""
        held, self.chunks = self.chunks, []
        self.buffered = 0
        for chunk in held:
            consumer.on_body(chunk)
        self.consumer = consumer
        self._conn.resume_reading(_BODY_PAUSE)
        if self.complete:
            consumer.on_end()


class Request:
    __slots__ = (
        "body",
        "chunked",
        "client_ip",
        "conn",
        "connection_tokens",
        "content_length",
        "expect_continue",
        "forwarded_for",
        "head_size",
        "headers",
        "host",
        "host_count",
        "keep_alive",
        "lowered",
        "method",
        "path",
        "request_id",
        "target",
        "trace",
        "upgrade",
        "version",
    )

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.method = b""
        self.target = b""
        self.path = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.lowered: list[bytes] = []  # header names lower-cased once, same order as headers
        self.host: bytes | None = None
        self.host_count = 0
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.expect_continue = False
        self.connection_tokens: tuple[bytes, ...] = ()
        self.upgrade = False
        self.body: RequestBody | None = None
        self.request_id: bytes | None = None
        self.forwarded_for: bytes | None = None
        self.trace: bytes | None = None  # X-Sluicegate-Trace: the admin token, if any
        self.client_ip: str | None = None  # resolved once (Runtime.client_ip), when needed
        self.head_size = 0

    def header(self, lowered_name: bytes) -> bytes | None:
        try:
            return self.headers[self.lowered.index(lowered_name)][1]
        except ValueError:
            return None

    def add_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.lowered.append(name.lower())

    def close_after(self) -> None:
        """The connection ends after this request's response (it said Connection: close)."""
        self.keep_alive = False

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)
