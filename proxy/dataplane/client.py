"""The client-facing HTTP/1.1 engine: parse strictly, frame responses ourselves, stream.

Theory of operation. One ``ClientConnection`` per accepted socket, one httptools (llhttp)
request parser per connection. llhttp rejects most ambiguous framing by itself (both
Content-Length and Transfer-Encoding, differing Content-Lengths, a Transfer-Encoding that
does not end in ``chunked``, bad chunk sizes, invalid bytes in names and values); its
callbacks (``HeadReader``, http/request_head.py, compiled) add what it allows but a proxy
must not (obs-fold, repeated framing headers, CONNECT, foreign absolute-form targets, a
missing Host, a request-target http/pathnorm.py refuses), and so does this engine (a
chunk-size line or trailer section http/chunkline.py bounds). A request that fails any
check is answered by us and the connection is closed: nothing unparsed is ever forwarded.
A chunked body's framing is walked by its ``ChunkedScanner`` ahead of the parser, over
exactly the bytes the parser is fed next (``_piece_end``).

Requests are handled one at a time in arrival order (pipelining), and the next one is read
only once the current response is on its way (as nginx and HAProxy do), so memory per
connection stays bounded whatever the pipelining depth. What the client sends while a
response is being relayed stays unparsed in ``_backlog`` and reading pauses; the parser is
fed one message at a time (``_piece_end``), never past the end of the current request. When
the response has been handed to the transport and its write buffer is under the low-water
mark (``pause_writing``/``resume_writing``: a client that does not read stops us here),
``_next_request`` parses on. Bodies stream through ``RequestBody``, which either buffers
(so a retry can replay it) or hands chunks to the upstream as they come, with backpressure
both ways through ``pause_reading``/``pause_writing``.

Deadlines (one coarse sweep, see dataplane/timers.py): a new or kept-alive idle connection
closes after ``keepalive_timeout`` (new ones after ``client_header_timeout``); a started
head must be complete within ``client_header_timeout`` of its first byte (of the previous
response's end on a kept-alive connection), else 408; a body stalls at most ``client_body_timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools

from proxy.dataplane.flow import PauseReason, ProxyConnection
from proxy.dataplane.timers import sweeper_for
from proxy.http.chunkline import TRAILERS_TOO_LARGE, ChunkedScanner
from proxy.http.request_head import HeadReader, RequestRejected

if TYPE_CHECKING:
    from proxy.dataplane.timers import Sweeper

# Headers that describe one connection, not the message (RFC 9110 7.6.1): never
# forwarded, never stored.
HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    )
)
HEAD_END = b"\r\n\r\n"
# Reasons to pause reading that are ours to lift: any other also stops the parser (a held
# body, an upstream that cannot take the body, a connection closing or switching).
OWN_PAUSE = PauseReason.PIPELINE
# Module constants: identity tests against them, no attribute lookup on the enum class.
_BODY_PAUSE = PauseReason.BODY
_CLOSING_PAUSE = PauseReason.CLOSING
_UPGRADE_PAUSE = PauseReason.UPGRADE
_REJECTED_PAUSE = PauseReason.REJECTED
_CLIENT_PAUSE = PauseReason.CLIENT
WRITE_HIGH_WATER = 256 * 1024
BODY_HIGH_WATER = 256 * 1024


class Deadline(enum.Enum):
    """Which clock a client connection's deadline runs on, and what its expiry means."""

    IDLE = "idle"  # keep-alive between requests: close quietly
    HEAD = "head"  # a request head arriving: 408
    BODY = "body"  # a request body arriving, nothing answered yet: 408
    BUSY = "busy"  # answering: no client clock runs; close if it fires


_IDLE = Deadline.IDLE
_HEAD = Deadline.HEAD
_BODY = Deadline.BODY
_BUSY = Deadline.BUSY

REASONS = {
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


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

    def __init__(self, conn: ClientConnection) -> None:
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

    def __init__(self, conn: ClientConnection) -> None:
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


class ConnectionLimits:
    """The config's ``limits`` as plain attributes: connections read them on every request.

    The config is a pydantic model, and a pydantic model's type has a ``__getattr__``
    hook: each attribute read then takes the interpreter's slow path (about 600
    instructions instead of a specialised slot read, three reads a request).
    """

    __slots__ = (
        "client_body_timeout",
        "client_header_timeout",
        "keepalive_timeout",
        "max_body_bytes",
        "max_connections",
        "max_header_bytes",
    )

    def __init__(self, limits: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(limits, name))


def error_body(status: int, reason: str, request_id: bytes | str) -> bytes:
    if isinstance(request_id, bytes):
        request_id = request_id.decode("latin-1")
    return json.dumps({"error": reason, "request_id": request_id}).encode()


def error_response(
    status: int,
    reason: str,
    request_id: bytes | str,
    *,
    close: bool,
    extra_headers: bytes = b"",
) -> bytes:
    body = error_body(status, reason, request_id)
    rid = request_id if isinstance(request_id, bytes) else request_id.encode()
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error")),
            b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body),
            b"X-Request-ID: " + rid + b"\r\n",
            extra_headers,
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        )
    )


class ClientConnection(ProxyConnection, asyncio.Protocol):
    """One client socket. ``handler(conn, request)`` answers: it returns a coroutine to run,
    or None when it answers by callbacks and calls ``request_done`` itself. Its deadlines
    run on ``sweeper``'s clock: the loop's shared one unless a test injects its own."""

    def __init__(self, listener: Any, sweeper: Sweeper | None = None) -> None:
        self.listener = listener
        self.limits = listener.limits
        self.handler: Callable[..., Any] = listener.handler
        self.loop = asyncio.get_running_loop()
        self._sweeper = sweeper or sweeper_for(self.loop)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.scheme = listener.scheme
        self._reader = HeadReader(self, self.limits.max_header_bytes, self.limits.max_body_bytes)
        self._parser = self._reader.new_parser(httptools.HttpRequestParser)
        self._parsing: Request | None = None
        self._current: Request | None = None
        self._queue: collections.deque[Request] = collections.deque()
        self._reading_paused_for: set[PauseReason] = set()
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.deadline = 0.0
        self._deadline_kind = _IDLE
        self._head_started_at = 0.0
        self._head_bytes = 0
        self.response_started = False
        # The upstream whose response we relay: a client that cannot keep up stops us
        # reading it (backpressure, ``relay_from``).
        self._relaying_from: ProxyConnection | None = None
        self.tunnel: Any = None
        self.requests_served = 0
        self._early_tunnel_bytes = b""
        self._upgrading: Request | None = None
        self._tied: Any = None  # an upstream exchange aborted if the client goes (tie_upstream)
        self._pending_reject: tuple[int, str, Request | None] | None = None
        # What reject() answered before closing (408 stalled body, 413 too large): the
        # request in flight then ends with that answer, not as a client gone away.
        self.rejected_with: tuple[int, str, int] | None = None  # status, reason, bytes sent
        self._client_eof = False
        self._dispatching = False  # inside _start's handler loop
        self._deferred: Request | None = None  # started meanwhile, for that loop to run
        self._fed = 0
        self._head_began_at = -1
        self._backlog = b""  # received, not parsed yet: from _backlog_at on
        self._backlog_at = 0
        self._fed_tail = b""  # the last bytes fed: a head's end may straddle two reads
        self._pumping = False
        self._pump_scheduled = False
        self._awaiting_drain = False  # answered; the next waits for the client to read
        self._pipelined = False  # the backlog was sent behind a request in flight
        self._chunks = ChunkedScanner(trailer_limit=self.limits.max_header_bytes)

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else "unix"
        self._sweeper.watch(self)
        now = self._sweeper.now
        self._head_started_at = now
        self.deadline = now + self.limits.client_header_timeout
        self._deadline_kind = _IDLE
        self.listener.connection_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._sweeper.unwatch(self)
        self.listener.connection_closed(self)
        if self._tied is not None:
            self._tied.abort()
        for request in (self._parsing, self._current, *self._queue):
            if request is not None and request.body is not None and not request.body.complete:
                request.body.fail(ConnectionResetError("client went away"))
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ConnectionResetError("client went away"))
        if self.tunnel is not None:
            self.tunnel.client_closed()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self._deadline_kind is _IDLE:
            self._deadline_kind = _HEAD
            if self.requests_served == 0:
                self._head_started_at = self._sweeper.now
            self.deadline = self._head_started_at + self.limits.client_header_timeout
        if self._backlog:
            self._backlog = self._backlog[self._backlog_at :] + data
        else:
            self._backlog = data
            self._pipelined = False
        self._backlog_at = 0
        if self._current is not None or self._awaiting_drain:
            self._pipelined = True
        self._pump()

    # -- parsing, one message at a time ---------------------------------------------------

    def _may_parse(self) -> bool:
        """May the parser go on? Not past the current request's end while it is answered
        (nor while its answer waits for the client to read), nor while anything but the
        pipeline itself holds reading paused."""
        if self._awaiting_drain or self.closed:
            return False
        paused = self._reading_paused_for
        if paused and (len(paused) > 1 or OWN_PAUSE not in paused):
            return False
        current = self._current
        return current is None or self._parsing is current  # ... or its body still comes

    def _pump(self) -> None:
        """Feed the backlog to the parser while it may go on; pause reading while bytes
        wait. Handlers that answer at once call back into here: the outer loop goes on."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._backlog and (
                # _may_parse's answer for a connection between requests, without the call
                (
                    self._current is None
                    and not self._reading_paused_for
                    and not self._awaiting_drain
                    and not self.closed
                )
                or self._may_parse()
            ):
                data, start = self._backlog, self._backlog_at
                length = self._piece_end(data, start)
                if length < 0:
                    break
                end = start + length
                if end >= len(data):
                    self._backlog, self._backlog_at = b"", 0
                else:
                    self._backlog_at = end
                if not self._parse(data, start, end):
                    break
                if self._current is not None:
                    self._pipelined = True  # what is left came behind it
        finally:
            self._pumping = False
        if self.closed:
            return
        if self._backlog:
            self.pause_reading(OWN_PAUSE)
        elif OWN_PAUSE in self._reading_paused_for and not self._queue:
            self.resume_reading(OWN_PAUSE)
        if self._current is None and not self._awaiting_drain:
            self._arm_wait_deadline()

    def _piece_end(self, data: bytes, start: int) -> int:
        """How many bytes of ``data`` from ``start`` to feed at once: up to the end of the
        message being parsed (its head, or a body of known length), so that the parser
        never runs ahead into the next request. A chunked body is fed up to its end as its
        scanner (http/chunkline.py) finds it, the scanner walking the framing first: -1 when the
        scanner refused it (the connection has answered)."""
        parsing = self._parsing
        if parsing is not None and parsing.method:
            scanner = self._chunks
            if scanner.active:
                refused, body_end = scanner.scan(data, start, len(data))
                if refused is not None:
                    self.reject(431 if refused == TRAILERS_TOO_LARGE else 400, refused)
                    return -1
                return len(data) - start if body_end <= start else body_end - start
            if parsing.content_length is not None:
                body = parsing.body
                left = parsing.content_length - (body.received if body is not None else 0)
                if left > 0:
                    return min(left, len(data) - start)
        tail = self._fed_tail
        if tail:
            # The previous piece may have ended inside CRLFCRLF: this one ends with it.
            for fed in (3, 2, 1):
                if tail.endswith(HEAD_END[:fed]) and data.startswith(HEAD_END[fed:], start):
                    return 4 - fed
        end = data.find(HEAD_END, start)
        return len(data) - start if end < 0 else end + 4 - start

    def _parse(self, data: bytes, start: int, end: int) -> bool:
        """Feed ``data[start:end]`` to the parser. False when parsing stops here for good
        (a rejection, an upgrade, the end of the connection)."""
        piece = memoryview(data)[start:end] if start or end < len(data) else data
        self._fed = 0  # bytes of this piece known to belong to earlier messages (approx.)
        self._head_began_at = -1
        try:
            self._parser.feed_data(piece)
        except httptools.HttpParserUpgrade as upgrade:
            # What follows the offer is the client's (tunnel or HTTP), never this parser's.
            rest = data[start + upgrade.args[0] :]
            self._backlog, self._backlog_at = b"", 0
            self._upgrade_requested(rest)
            return not self.closed and _UPGRADE_PAUSE not in self._reading_paused_for
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, RequestRejected):
                self.reject(cause.status, cause.reason)
            else:
                self.reject(400, "malformed request")
            return False
        except httptools.HttpParserError as error:
            if _CLOSING_PAUSE in self._reading_paused_for:
                return False  # bytes after a request that ends the connection: never parsed
            self.reject(400, _parser_reason(error))
            return False
        parsing = self._parsing
        # Mid-message, the end of what was fed may be the start of the head's last CRLFCRLF.
        self._fed_tail = b"" if parsing is None else data[max(start, end - 3) : end]
        if parsing is not None and not parsing.method:
            # Everything since the head began is still head: bound what llhttp accumulates.
            # A head that began in this piece owns only what follows the message before it
            # (a body's last bytes): those must not count against it.
            began = self._head_began_at
            size = end - start
            self._head_bytes += size - began if began >= 0 else size
            if self._head_bytes > self.limits.max_header_bytes:
                self.reject(431, "request head too large")
                return False
        return True

    def resume_reading(self, reason: str) -> None:
        super().resume_reading(reason)
        # Bytes that waited for this (a held body, a slow upstream) are parsed on the next
        # tick: never from inside the code that lifted the pause.
        if self._backlog and reason != OWN_PAUSE and not self._pump_scheduled:
            self._pump_scheduled = True
            self.loop.call_soon(self._scheduled_pump)

    def _scheduled_pump(self) -> None:
        self._pump_scheduled = False
        self._pump()

    def _arm_wait_deadline(self) -> None:
        """Nothing in flight: a started head must complete within client_header_timeout
        (from the end of the previous response), an idle connection closes after
        keepalive_timeout; a client that half-closed is done."""
        if self._client_eof:
            self.close()  # answered all it sent; it will send nothing more
            return
        if self._parsing is not None:
            self._deadline_kind = _HEAD
            self.deadline = self._head_started_at + self.limits.client_header_timeout
        elif self.requests_served:
            self._deadline_kind = _IDLE
            self.deadline = self._head_started_at + self.limits.keepalive_timeout
        # else a new connection whose first bytes began no request yet: its deadline stands

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._relaying_from is not None:
            self._relaying_from.pause_reading(_CLIENT_PAUSE)

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._relaying_from is not None:
            self._relaying_from.resume_reading(_CLIENT_PAUSE)
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._awaiting_drain:
            self._awaiting_drain = False
            if not self.closed:  # closed meanwhile (a shutdown): what waited is dropped
                self._next_request()

    def eof_received(self) -> bool | None:
        # A half-closed client may still read its response (curl does this with uploads):
        # keep the connection while a request is being answered, close it after. With
        # nothing in flight (idle keep-alive, or a head that can now never complete) the
        # client is done: close at once, freeing the slot for max_connections.
        if self.tunnel is not None:
            self.tunnel.client_closed()
            return False
        self._client_eof = True
        current = self._current
        if current is not None and current.body is not None and not current.body.complete:
            # Its body can never arrive now: the client left mid-request. Closing ends
            # it as a reset would (499, upstream exchange aborted), not at
            # client_body_timeout.
            return False
        return current is not None or self._awaiting_drain or bool(self._backlog)

    # -- the head, as HeadReader (http/request_head.py) passes it on -----------------------

    def message_begun(self) -> Request:
        """A message begins: the request its head is read into."""
        self._head_began_at = self._fed
        request = self._parsing = Request(self)
        return request

    def head_parsed(self, request: Request, upgrade_offered: bool) -> None:
        """``request``'s head passed every check of the reader: start it, or queue it."""
        if upgrade_offered:
            self._upgrading = request  # llhttp stops after this head: see _upgrade_requested
        if request.host is None:
            # HTTP/1.0 without Host: name the address the client connected to, so the
            # HTTP/1.1 request we send upstream carries the Host it must have.
            sockname = self.transport.get_extra_info("sockname")  # type: ignore[union-attr]
            local = b"%s:%d" % (sockname[0].encode(), sockname[1]) if sockname else b"localhost"
            request.host = local
            request.add_header(b"Host", local)
        if request.chunked or request.content_length:  # has_body, without the call
            request.body = RequestBody(self)
            if request.chunked:
                self._chunks.begin()  # at the next byte: the piece ends with this head
        if request.upgrade and self._pipelined:
            # A WebSocket offer sent behind another request, before its answer: whether
            # the connection switches must not hang on what that answer turns out to be.
            raise RequestRejected(400, "upgrade while a request is in flight")
        self._head_bytes = 0
        self._fed += request.head_size + 2
        if self._current is None:
            self._arm_body_deadline(request)
            self._start(request)
        else:
            # Parsed in the same piece as the end of a chunked body (see _piece_end): it
            # waits its turn. Its body deadline starts when it does: until then reading is
            # paused by us.
            self._queue.append(request)
            self.pause_reading(OWN_PAUSE)

    def _arm_body_deadline(self, request: Request) -> None:
        waiting = request.body is not None and not request.body.complete
        self._deadline_kind = _BODY if waiting else _BUSY
        self.deadline = self._sweeper.now + self.limits.client_body_timeout if waiting else 0.0

    # -- the body, and the end of the message (llhttp, through the reader) -----------------

    def on_body(self, chunk: bytes) -> None:
        request = self._parsing
        assert request is not None and request.body is not None
        body = request.body
        if body.received + len(chunk) > self.limits.max_body_bytes:
            raise RequestRejected(413, "request body too large")
        if request is self._current:
            self.deadline = self._sweeper.now + self.limits.client_body_timeout
        self._fed += len(chunk)
        body.feed(chunk)

    def on_message_complete(self) -> None:
        request = self._parsing
        assert request is not None
        self._parsing = None
        if request.chunked:
            self._chunks.stop()  # it saw the end too; this keeps the two in step regardless
        if request.body is not None:
            request.body.finish()
        if self._current is request:
            self._deadline_kind = _BUSY
            self.deadline = 0.0
        if not request.keep_alive:
            # Whatever follows a request that ends the connection is not ours to parse.
            self.pause_reading(_CLOSING_PAUSE)

    # -- what the pipeline changes, through these (proxy.pipeline.downstream) -------------

    def begin_response(self) -> None:
        """The response's first bytes are going out: a failure now can only cut the
        connection, and a rejection (408) may no longer answer."""
        self.response_started = True

    def respond(self, head: bytes, body: bytes = b"") -> None:
        """A response in one piece (``begin_response`` and the write, in one call: the
        common answer's path): ``head`` and ``body`` in one system call."""
        self.response_started = True
        if not self.closed:
            if len(body) <= 4096:
                self.transport.write(head + body)  # type: ignore[union-attr]
            else:
                self.transport.writelines((head, body))  # type: ignore[union-attr]

    def relay_from(self, upstream: ProxyConnection | None) -> None:
        """Relaying ``upstream``'s response (None: no longer): while the client cannot
        keep up, ``upstream`` is not read."""
        self._relaying_from = upstream

    def tie_upstream(self, upstream: Any) -> None:
        """``upstream``'s exchange serves this client's current request: it is aborted if
        the client goes away first. Untied when the request is done."""
        self._tied = upstream

    def open_tunnel(self, tunnel: Any) -> None:
        """The connection switched protocols: raw bytes go to ``tunnel.from_client`` and
        its end to ``tunnel.client_closed``."""
        self.tunnel = tunnel

    # -- request lifecycle ---------------------------------------------------------------

    def _start(self, request: Request) -> None:
        self._current = request
        self.response_started = False
        if self._dispatching:
            # A request answered at once (a 404, a 429) started this one from inside its
            # handler: the loop below runs it, so a long pipeline never nests deeper.
            self._deferred = request
            return
        self._dispatching = True
        try:
            next_request: Request | None = request
            while next_request is not None:
                self._deferred = None
                try:
                    work = self.handler(self, next_request)
                except Exception:
                    self.request_crashed(next_request)
                    return
                if work is not None:
                    self.serve_async(next_request, work)
                next_request = self._deferred
        finally:
            self._dispatching = False

    def serve_async(self, request: Request, work: Any) -> None:
        """Answer ``request`` by running the coroutine ``work`` to its end."""
        self.loop.create_task(self._run(request, work))

    async def _run(self, request: Request, work: Any) -> None:
        try:
            await work
        except Exception:
            self.request_crashed(request)
            return
        self.request_done(request)

    def request_crashed(self, request: Request) -> None:
        """A bug while serving ``request`` (called from an ``except`` block): 500, close."""
        self.listener.log_exception("unhandled error while serving a request")
        self._tied = None
        if not self.response_started and not self.closed:
            rid = request.request_id or b"-"
            self.write(error_response(500, "internal error", rid, close=True))
        self.close()

    def request_done(self, request: Request) -> None:
        """``request`` has been answered (its response handed to the transport): the next
        one may start once the client has taken most of it."""
        if request is not self._current:
            return
        self._current = None
        self._tied = None
        self.requests_served += 1
        self.response_started = False  # a later rejection (or 408) may answer again
        if self.closed:
            return
        body = request.body
        if (
            not request.keep_alive
            or (body is not None and not body.complete)
            or self.listener.closing_idle
        ):
            # A request body we did not read in full leaves the stream out of step. While
            # draining, an answer that said Connection: close set keep_alive; one that did
            # not (begun before the drain) keeps the connection: the client may already
            # be sending its next request, which will be answered with a close.
            self.close()
            return
        if self._writing_paused:
            # The client is not reading: answers would pile up in the write buffer. The
            # next request waits until it is under its low-water mark (resume_writing).
            self._awaiting_drain = True
            self._deadline_kind = _BUSY
            self.deadline = 0.0
            return
        self._next_request()

    def _next_request(self) -> None:
        """The previous response is on its way: start the next request, or wait for one."""
        if self._queue:
            queued = self._queue.popleft()
            self._arm_body_deadline(queued)
            self._start(queued)
            self._pump()  # lifts the pipeline pause once nothing waits
            return
        pending = self._pending_reject
        if pending is not None:
            # A later pipelined request was bad: answer it now that those before it are.
            self._pending_reject = None
            self._parsing = pending[2]
            self.reject(pending[0], pending[1])
            return
        # client_header_timeout for a head that follows counts from here.
        self._head_started_at = self._sweeper.now
        if self.tunnel is None and _UPGRADE_PAUSE in self._reading_paused_for:
            # The upstream declined the upgrade (no 101): the connection goes on as HTTP.
            self.resume_reading(_UPGRADE_PAUSE)
            self._continue_as_http(self.take_early_tunnel_bytes())
        if self._backlog or self._pumping or self._reading_paused_for:
            self._pump()
        elif not self.closed and self._current is None and not self._awaiting_drain:
            # Nothing received and nothing paused (a keep-alive client waiting for its
            # answer): all _pump would do is arm the wait, so arm it without the call.
            self._arm_wait_deadline()

    def on_deadline(self) -> None:
        kind = self._deadline_kind
        if kind is _IDLE:
            self.close()
        elif (kind is _HEAD or kind is _BODY) and not self.response_started:
            self.reject(408, "client timed out")
        else:
            self.close()

    # -- output --------------------------------------------------------------------------

    async def drain(self) -> None:
        if self._writing_paused and not self.closed:
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def reject(self, status: int, reason: str, failed: Request | None = None) -> None:
        """Answer a request we will not forward, then close: the stream cannot be trusted.
        ``failed``: the request refused, when not the one being parsed."""
        if self.closed:
            return
        current = self._current
        failed = failed or self._parsing
        if current is not None and failed is not current:
            # The bad bytes follow a request still being answered: answering now would
            # put our error in that request's place. Stop reading; answer in order.
            if self._pending_reject is None:
                self._pending_reject = (status, reason, failed)
                self.pause_reading(_REJECTED_PAUSE)
                if failed is not None:
                    # Its answer is this rejection, in its turn: it never starts.
                    with contextlib.suppress(ValueError):
                        self._queue.remove(failed)
                    if failed.body is not None and not failed.body.complete:
                        failed.body.fail(ConnectionAbortedError(reason))
            return
        request = failed or current
        if not self.response_started:
            if request is None:
                request = Request(self)  # nothing parsed yet: still a request, for the log
            if request.request_id is None:
                request.request_id = self.listener.new_request_id()
            answer = error_response(status, reason, request.request_id, close=True)
            self.write(answer)
            self.rejected_with = (status, reason, len(answer))
            # A request already handed on is logged by its handler, with this answer.
            self.listener.record_rejection(
                self,
                request,
                status,
                reason,
                bytes_out=len(answer),
                seconds=self._sweeper.now - self._head_started_at,
                handed_on=request is current,
            )
        if request is not None and request.body is not None and not request.body.complete:
            request.body.fail(ConnectionAbortedError(reason))
        self.close()

    def _upgrade_requested(self, tail: bytes) -> None:
        # llhttp stops at the end of an upgrade request's head (on_headers_complete has
        # started or queued it already); what follows is the client's first tunnel bytes,
        # kept until the upstream agrees to switch.
        request, self._upgrading = self._upgrading, None
        if request is None or self.closed:
            self.close()
            return
        if not request.upgrade:
            # Not a WebSocket: an ordinary request whose Upgrade offer we do not pass on.
            if request.has_body:
                self.reject(400, "upgrade offer with a request body")
                return
            self._continue_as_http(tail)
            return
        self.pause_reading(_UPGRADE_PAUSE)
        self._early_tunnel_bytes = tail
        if request is not self._current:
            self.reject(400, "upgrade while a request is in flight", request)

    def _continue_as_http(self, tail: bytes) -> None:
        """No tunnel after all: llhttp stops for good at an upgrade, so a fresh parser
        reads on (``_pump``), from what the client sent after that head."""
        self._parser = self._reader.new_parser(httptools.HttpRequestParser)
        self._fed_tail = b""
        if tail and _CLOSING_PAUSE not in self._reading_paused_for:
            self._backlog = tail + self._backlog[self._backlog_at :]
            self._backlog_at = 0

    def take_early_tunnel_bytes(self) -> bytes:
        data, self._early_tunnel_bytes = self._early_tunnel_bytes, b""
        return data

    @property
    def idle(self) -> bool:
        return self._current is None and self._parsing is None


def _parser_reason(error: Exception) -> str:
    text = str(error).lower()
    if "content-length" in text or "transfer-encoding" in text or "chunk" in text:
        return "ambiguous or invalid message framing"
    if "method" in text:
        return "invalid method"
    if "header" in text:
        return "invalid header"
    return "malformed request"
