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

Compiled (proxy/compiled.py), the engine is an extension type, ``ClientEngine``: its state
is C fields, its steps C functions, so the per-request work (receive, pump, parse, start,
answer, done, next) runs no interpreted bytecode. ``ClientConnection`` is a Python class on
top of it (an extension type cannot have asyncio.Protocol as a base),
whose ``__dict__`` holds what the interpreted pipeline reads on every request. ``Request``
and ``RequestBody`` (dataplane/request.py) stay Python classes for the same reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import json
from typing import TYPE_CHECKING, Any

import httptools

try:
    import cython
except ModuleNotFoundError:  # run as Python where Cython is not installed
    from proxy import cythonshim as cython

from proxy.dataplane.flow import PauseReason
from proxy.dataplane.request import BODY_HIGH_WATER, Request, RequestBody
from proxy.dataplane.timers import sweeper_for
from proxy.http.chunkline import TRAILERS_TOO_LARGE, ChunkedScanner
from proxy.http.request_head import HeadReader, RequestRejected

if TYPE_CHECKING:
    from proxy.dataplane.timers import Sweeper

__all__ = [
    "BODY_HIGH_WATER",
    "HOP_BY_HOP",
    "REASONS",
    "ClientConnection",
    "ConnectionLimits",
    "Deadline",
    "Request",
    "RequestBody",
    "error_body",
    "error_response",
]

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
HEAD_END = cython.declare(bytes, b"\r\n\r\n")
# Reasons to pause reading that are ours to lift: any other also stops the parser (a held
# body, an upstream that cannot take the body, a connection closing or switching).
OWN_PAUSE = PauseReason.PIPELINE
# Module constants, C variables compiled: identity tests against them, no lookup.
_OWN_PAUSE = cython.declare(object, PauseReason.PIPELINE)
_CLOSING_PAUSE = cython.declare(object, PauseReason.CLOSING)
_UPGRADE_PAUSE = cython.declare(object, PauseReason.UPGRADE)
_REJECTED_PAUSE = cython.declare(object, PauseReason.REJECTED)
_CLIENT_PAUSE = cython.declare(object, PauseReason.CLIENT)
WRITE_HIGH_WATER = 256 * 1024


class Deadline(enum.Enum):
    """Which clock a client connection's deadline runs on, and what its expiry means."""

    IDLE = "idle"  # keep-alive between requests: close quietly
    HEAD = "head"  # a request head arriving: 408
    BODY = "body"  # a request body arriving, nothing answered yet: 408
    BUSY = "busy"  # answering: no client clock runs; close if it fires


# The engine keeps its Deadline as a C integer: the index of the member here.
_KINDS = (Deadline.IDLE, Deadline.HEAD, Deadline.BODY, Deadline.BUSY)
_K_IDLE = cython.declare(cython.int, 0)
_K_HEAD = cython.declare(cython.int, 1)
_K_BODY = cython.declare(cython.int, 2)
_K_BUSY = cython.declare(cython.int, 3)

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


@cython.cclass
class ClientEngine:
    """The per-connection state and per-request logic of ``ClientConnection``, typed: its
    fields are C fields and its internal steps C functions, so a request runs no
    interpreted bytecode here and few Python-level calls. ``ClientConnection`` adds what an
    extension type cannot have (asyncio.Protocol as a base, attributes
    in a ``__dict__``). The fields other code reads are ``public``; the rest are the
    engine's own. Python attributes the pipeline reads on every request (``loop``,
    ``listener``, ``peer``, ``scheme``) stay in the instance's ``__dict__``: an extension
    type's field costs interpreted code a descriptor call each read."""

    # -- what the pipeline, the cache and the sweeper read or set (Downstream)
    closed = cython.declare(cython.bint, visibility="public")
    response_started = cython.declare(cython.bint, visibility="public")
    deadline = cython.declare(cython.double, visibility="public")
    transport = cython.declare(object, visibility="public")
    tunnel = cython.declare(object, visibility="public")
    requests_served = cython.declare(cython.Py_ssize_t, visibility="public")
    # What reject() answered before closing (408 stalled body, 413 too large): the
    # request in flight then ends with that answer, not as a client gone away.
    rejected_with = cython.declare(object, visibility="public")  # status, reason, bytes sent
    handler = cython.declare(object, visibility="public")
    limits = cython.declare(object, visibility="public")
    # -- the engine's own (a few readonly, for tests)
    _listener = cython.declare(object)
    _loop = cython.declare(object)
    _sweeper = cython.declare(object, visibility="readonly")
    _header_timeout = cython.declare(cython.double)
    _body_timeout = cython.declare(cython.double)
    _keepalive_timeout = cython.declare(cython.double)
    _max_header_bytes = cython.declare(cython.Py_ssize_t)
    _max_body_bytes = cython.declare(object)
    _reader = cython.declare(object)
    _parser = cython.declare(object)
    _parsing = cython.declare(object)  # the Request being parsed
    _current = cython.declare(object)  # the Request being answered
    _queue = cython.declare(object, visibility="readonly")
    _reading_paused_for = cython.declare(set, visibility="readonly")
    _writing_paused = cython.declare(cython.bint)
    _drain_waiter = cython.declare(object)
    _kind = cython.declare(cython.int)  # the deadline's Deadline, as its index in _KINDS
    _head_started_at = cython.declare(cython.double, visibility="readonly")
    _head_bytes = cython.declare(cython.Py_ssize_t)
    # The upstream whose response we relay: a client that cannot keep up stops us
    # reading it (backpressure, ``relay_from``).
    _relaying_from = cython.declare(object)
    _early_tunnel_bytes = cython.declare(bytes)
    _upgrading = cython.declare(object)
    _tied = cython.declare(object)  # an upstream exchange aborted if the client goes
    _pending_reject = cython.declare(object)  # (status, reason, Request | None) or None
    _client_eof = cython.declare(cython.bint)
    _dispatching = cython.declare(cython.bint)  # inside _start's handler loop
    _deferred = cython.declare(object)  # a Request started meanwhile, for that loop to run
    _fed = cython.declare(cython.Py_ssize_t)
    _head_began_at = cython.declare(cython.Py_ssize_t)
    _backlog = cython.declare(bytes)  # received, not parsed yet: from _backlog_at on
    _backlog_at = cython.declare(cython.Py_ssize_t)
    _fed_tail = cython.declare(bytes)  # the last bytes fed: a head's end may straddle two reads
    _pumping = cython.declare(cython.bint, visibility="readonly")
    _pump_scheduled = cython.declare(cython.bint)
    _awaiting_drain = cython.declare(cython.bint)  # answered; the next waits for the client
    _pipelined = cython.declare(cython.bint)  # the backlog was sent behind a request in flight
    _chunks = cython.declare(object)
    # What head_parsed learnt of the message being parsed, for the calls that follow it.
    _parsing_length = cython.declare(cython.Py_ssize_t)  # body bytes left to feed; -1 none
    _parsing_chunked = cython.declare(cython.bint)
    _parsing_body = cython.declare(object)

    def __init__(self, listener: Any, sweeper: Sweeper | None = None) -> None:
        limits = listener.limits
        self._listener = listener
        self.limits = limits
        self.handler = listener.handler
        self._loop = asyncio.get_running_loop()
        self._sweeper = sweeper or sweeper_for(self._loop)
        # Copied once as C values: read on every request (ConnectionLimits' figures are
        # fixed for a connection's configuration generation).
        self._header_timeout = limits.client_header_timeout
        self._body_timeout = limits.client_body_timeout
        self._keepalive_timeout = limits.keepalive_timeout
        self._max_header_bytes = limits.max_header_bytes
        self._max_body_bytes = limits.max_body_bytes
        self.transport = None
        self._reader = HeadReader(self, limits.max_header_bytes, limits.max_body_bytes)
        self._parser = self._reader.new_parser(httptools.HttpRequestParser)
        self._parsing = None
        self._current = None
        self._queue = collections.deque()
        self._reading_paused_for = set()
        self._writing_paused = False
        self._drain_waiter = None
        self.closed = False
        self.deadline = 0.0
        self._kind = _K_IDLE
        self._head_started_at = 0.0
        self._head_bytes = 0
        self.response_started = False
        self._relaying_from = None
        self.tunnel = None
        self.requests_served = 0
        self._early_tunnel_bytes = b""
        self._upgrading = None
        self._tied = None
        self._pending_reject = None
        self.rejected_with = None
        self._client_eof = False
        self._dispatching = False
        self._deferred = None
        self._fed = 0
        self._head_began_at = -1
        self._backlog = b""
        self._backlog_at = 0
        self._fed_tail = b""
        self._pumping = False
        self._pump_scheduled = False
        self._awaiting_drain = False
        self._pipelined = False
        self._chunks = ChunkedScanner(trailer_limit=limits.max_header_bytes)
        self._parsing_length = -1
        self._parsing_chunked = False
        self._parsing_body = None

    @property
    def _deadline_kind(self) -> Deadline:
        return _KINDS[self._kind]

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else "unix"
        self._sweeper.watch(self)
        now: cython.double = self._sweeper.now
        self._head_started_at = now
        self.deadline = now + self._header_timeout
        self._kind = _K_IDLE
        self._listener.connection_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._sweeper.unwatch(self)
        self._listener.connection_closed(self)
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
        if self._kind == _K_IDLE:
            self._kind = _K_HEAD
            if self.requests_served == 0:
                self._head_started_at = self._sweeper.now
            self.deadline = self._head_started_at + self._header_timeout
        if self._backlog:
            self._backlog = self._backlog[self._backlog_at :] + data
        else:
            self._backlog = data
            self._pipelined = False
        self._backlog_at = 0
        if self._current is not None or self._awaiting_drain:
            self._pipelined = True
        self._pump()

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

    # -- reading paused for named reasons (dataplane/flow.py), writes, close -----------------

    def pause_reading(self, reason: Any) -> None:
        self._pause(reason)

    @cython.cfunc
    def _pause(self, reason: object) -> None:
        if not self._reading_paused_for and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._reading_paused_for.add(reason)

    def resume_reading(self, reason: Any) -> None:
        self._resume(reason)
        # Bytes that waited for this (a held body, a slow upstream) are parsed on the next
        # tick: never from inside the code that lifted the pause.
        if self._backlog and reason is not _OWN_PAUSE and not self._pump_scheduled:
            self._pump_scheduled = True
            self._loop.call_soon(self._scheduled_pump)

    @cython.cfunc
    def _resume(self, reason: object) -> None:
        paused: set = self._reading_paused_for
        if reason in paused:
            paused.discard(reason)
            if not paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def reading_paused(self) -> bool:
        """Whether any reason holds reading paused."""
        return bool(self._reading_paused_for)

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def write_after(self, head: bytes, data: bytes) -> None:
        """``head`` then ``data`` in one system call (small ones joined, large ones writev):
        a head waits for its first body bytes, on both sides."""
        if not self.closed:
            if len(data) <= 4096:
                self.transport.write(head + data)
            else:
                self.transport.writelines((head, data))

    def close(self) -> None:
        """Close after what is buffered has been written."""
        self._close()

    @cython.cfunc
    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping what is buffered (a reset for the peer)."""
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    # -- parsing, one message at a time ---------------------------------------------------

    @cython.cfunc
    def _may_parse(self) -> cython.bint:
        """May the parser go on? Not past the current request's end while it is answered
        (nor while its answer waits for the client to read), nor while anything but the
        pipeline itself holds reading paused."""
        if self._awaiting_drain or self.closed:
            return False
        paused: set = self._reading_paused_for
        if paused and (len(paused) > 1 or _OWN_PAUSE not in paused):
            return False
        current = self._current
        return current is None or self._parsing is current  # ... or its body still comes

    @cython.cfunc
    def _pump(self) -> None:
        """Feed the backlog to the parser while it may go on; pause reading while bytes
        wait. Handlers that answer at once call back into here: the outer loop goes on."""
        if self._pumping:
            return
        self._pumping = True
        data: bytes
        start: cython.Py_ssize_t
        length: cython.Py_ssize_t
        end: cython.Py_ssize_t
        try:
            while self._backlog and self._may_parse():
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
            self._pause(_OWN_PAUSE)
        elif (
            self._reading_paused_for and _OWN_PAUSE in self._reading_paused_for and not self._queue
        ):
            self.resume_reading(_OWN_PAUSE)
        if self._current is None and not self._awaiting_drain:
            self._arm_wait_deadline()

    @cython.cfunc
    def _piece_end(self, data: bytes, start: cython.Py_ssize_t) -> cython.Py_ssize_t:
        """How many bytes of ``data`` from ``start`` to feed at once: up to the end of the
        message being parsed (its head, or a body of known length), so that the parser
        never runs ahead into the next request. A chunked body is fed up to its end as its
        scanner (http/chunkline.py) finds it, the scanner walking the framing first: -1 when the
        scanner refused it (the connection has answered)."""
        size: cython.Py_ssize_t = len(data)
        body_end: cython.Py_ssize_t
        if self._parsing is not None:
            if self._parsing_chunked:
                scanner = self._chunks
                if scanner.active:
                    refused, body_end = scanner.scan(data, start, size)
                    if refused is not None:
                        self.reject(431 if refused == TRAILERS_TOO_LARGE else 400, refused)
                        return -1
                    return size - start if body_end <= start else body_end - start
            elif self._parsing_length > 0:
                return min(self._parsing_length, size - start)
        tail: bytes = self._fed_tail
        fed: cython.Py_ssize_t
        if tail:
            # The previous piece may have ended inside CRLFCRLF: this one ends with it.
            for fed in range(3, 0, -1):
                if tail.endswith(HEAD_END[:fed]) and data.startswith(HEAD_END[fed:], start):
                    return 4 - fed
        # The head's end, CRLFCRLF, found by a C loop (bytes.find parses its arguments
        # from a tuple: several hundred instructions a call). Horspool's skip: the byte
        # under the window's last place says how far the window may move, four bytes
        # at a time over a field's text.
        i: cython.Py_ssize_t = start
        last: cython.Py_ssize_t = size - 3
        c: cython.int
        while i < last:
            c = data[i + 3]
            if c == 10:  # LF
                if data[i] == 13 and data[i + 1] == 10 and data[i + 2] == 13:
                    return i + 4 - start
                i += 2
            elif c == 13:  # CR
                i += 1
            else:
                i += 4
        return size - start

    @cython.cfunc
    def _parse(self, data: bytes, start: cython.Py_ssize_t, end: cython.Py_ssize_t) -> cython.bint:
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
        if parsing is None:
            self._fed_tail = b""
            return True
        # Mid-message, the end of what was fed may be the start of the head's last CRLFCRLF.
        self._fed_tail = data[max(start, end - 3) : end]
        if not parsing.method:
            # Everything since the head began is still head: bound what llhttp accumulates.
            # A head that began in this piece owns only what follows the message before it
            # (a body's last bytes): those must not count against it.
            began: cython.Py_ssize_t = self._head_began_at
            size: cython.Py_ssize_t = end - start
            self._head_bytes += size - began if began >= 0 else size
            if self._head_bytes > self._max_header_bytes:
                self.reject(431, "request head too large")
                return False
        return True

    def _scheduled_pump(self) -> None:
        self._pump_scheduled = False
        self._pump()

    @cython.cfunc
    def _arm_wait_deadline(self) -> None:
        """Nothing in flight: a started head must complete within client_header_timeout
        (from the end of the previous response), an idle connection closes after
        keepalive_timeout; a client that half-closed is done."""
        if self._client_eof:
            self._close()  # answered all it sent; it will send nothing more
            return
        if self._parsing is not None:
            self._kind = _K_HEAD
            self.deadline = self._head_started_at + self._header_timeout
        elif self.requests_served:
            self._kind = _K_IDLE
            self.deadline = self._head_started_at + self._keepalive_timeout
        # else a new connection whose first bytes began no request yet: its deadline stands

    # -- the head, as HeadReader (http/request_head.py) passes it on -----------------------

    def message_begun(self) -> Request:
        """A message begins: the request its head is read into."""
        self._head_began_at = self._fed
        request = self._parsing = Request(self)
        self._parsing_length = -1
        self._parsing_chunked = False
        self._parsing_body = None
        return request

    def head_parsed(self, request: Any, upgrade_offered: cython.bint) -> None:
        """``request``'s head passed every check of the reader: start it, or queue it."""
        if upgrade_offered:
            self._upgrading = request  # llhttp stops after this head: see _upgrade_requested
        if request.host is None:
            # HTTP/1.0 without Host: name the address the client connected to, so the
            # HTTP/1.1 request we send upstream carries the Host it must have.
            sockname = self.transport.get_extra_info("sockname")
            local = b"%s:%d" % (sockname[0].encode(), sockname[1]) if sockname else b"localhost"
            request.host = local
            request.add_header(b"Host", local)
        content_length = request.content_length
        chunked: cython.bint = request.chunked
        if chunked or content_length:  # has_body, without the call
            body = self._parsing_body = request.body = RequestBody(self)
            if chunked:
                self._parsing_chunked = True
                self._chunks.begin()  # at the next byte: the piece ends with this head
            else:
                self._parsing_length = content_length
        else:
            body = None
        if request.upgrade and self._pipelined:
            # A WebSocket offer sent behind another request, before its answer: whether
            # the connection switches must not hang on what that answer turns out to be.
            raise RequestRejected(400, "upgrade while a request is in flight")
        self._head_bytes = 0
        self._fed += request.head_size + 2
        if self._current is None:
            self._arm_body_deadline(body)
            self._start(request)
        else:
            # Parsed in the same piece as the end of a chunked body (see _piece_end): it
            # waits its turn. Its body deadline starts when it does: until then reading is
            # paused by us.
            self._queue.append(request)
            self._pause(_OWN_PAUSE)

    @cython.cfunc
    def _arm_body_deadline(self, body: object) -> None:
        if body is not None and not body.complete:
            self._kind = _K_BODY
            self.deadline = self._sweeper.now + self._body_timeout
        else:
            self._kind = _K_BUSY
            self.deadline = 0.0

    # -- the body, and the end of the message (llhttp, through the reader) -----------------

    def on_body(self, chunk: bytes) -> None:
        body = self._parsing_body
        size: cython.Py_ssize_t = len(chunk)
        if body.received + size > self._max_body_bytes:
            raise RequestRejected(413, "request body too large")
        if self._parsing is self._current:
            self.deadline = self._sweeper.now + self._body_timeout
        self._fed += size
        if self._parsing_length > 0:
            self._parsing_length -= size
        body.feed(chunk)

    def on_message_complete(self) -> None:
        request = self._parsing
        self._parsing = None
        if self._parsing_chunked:
            self._chunks.stop()  # it saw the end too; this keeps the two in step regardless
        body = self._parsing_body
        if body is not None:
            self._parsing_body = None
            body.finish()
        if self._current is request:
            self._kind = _K_BUSY
            self.deadline = 0.0
        if not request.keep_alive:
            # Whatever follows a request that ends the connection is not ours to parse.
            self._pause(_CLOSING_PAUSE)

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
                self.transport.write(head + body)
            else:
                self.transport.writelines((head, body))

    def relay_from(self, upstream: Any) -> None:
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

    @cython.cfunc
    def _start(self, request: object) -> None:
        self._current = request
        self.response_started = False
        if self._dispatching:
            # A request answered at once (a 404, a 429) started this one from inside its
            # handler: the loop below runs it, so a long pipeline never nests deeper.
            self._deferred = request
            return
        self._dispatching = True
        try:
            next_request = request
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

    def serve_async(self, request: Any, work: Any) -> None:
        """Answer ``request`` by running the coroutine ``work`` to its end."""
        self._loop.create_task(_run(self, request, work))

    def request_crashed(self, request: Any) -> None:
        """A bug while serving ``request`` (called from an ``except`` block): 500, close."""
        self._listener.log_exception("unhandled error while serving a request")
        self._tied = None
        if not self.response_started and not self.closed:
            rid = request.request_id or b"-"
            self.write(error_response(500, "internal error", rid, close=True))
        self._close()

    def request_done(self, request: Any) -> None:
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
            or self._listener.closing_idle
        ):
            # A request body we did not read in full leaves the stream out of step. While
            # draining, an answer that said Connection: close set keep_alive; one that did
            # not (begun before the drain) keeps the connection: the client may already
            # be sending its next request, which will be answered with a close.
            self._close()
            return
        if self._writing_paused:
            # The client is not reading: answers would pile up in the write buffer. The
            # next request waits until it is under its low-water mark (resume_writing).
            self._awaiting_drain = True
            self._kind = _K_BUSY
            self.deadline = 0.0
            return
        self._next_request()

    @cython.cfunc
    def _next_request(self) -> None:
        """The previous response is on its way: start the next request, or wait for one."""
        if self._queue:
            queued = self._queue.popleft()
            self._arm_body_deadline(queued.body)
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
        if self._reading_paused_for:
            if self.tunnel is None and _UPGRADE_PAUSE in self._reading_paused_for:
                # The upstream declined the upgrade (no 101): the connection goes on as HTTP.
                self.resume_reading(_UPGRADE_PAUSE)
                self._continue_as_http(self.take_early_tunnel_bytes())
            self._pump()
        elif self._backlog or self._pumping:
            self._pump()
        elif not self.closed and self._current is None and not self._awaiting_drain:
            # Nothing received and nothing paused (a keep-alive client waiting for its
            # answer): all _pump would do is arm the wait, so arm it without the call.
            self._arm_wait_deadline()

    def on_deadline(self) -> None:
        kind = self._kind
        if kind == _K_IDLE:
            self._close()
        elif kind in (_K_HEAD, _K_BODY) and not self.response_started:
            self.reject(408, "client timed out")
        else:
            self._close()

    # -- output --------------------------------------------------------------------------

    async def drain(self) -> None:
        if self._writing_paused and not self.closed:
            self._drain_waiter = self._loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def reject(self, status: int, reason: str, failed: Any = None) -> None:
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
                self._pause(_REJECTED_PAUSE)
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
                request.request_id = self._listener.new_request_id()
            answer = error_response(status, reason, request.request_id, close=True)
            self.write(answer)
            self.rejected_with = (status, reason, len(answer))
            # A request already handed on is logged by its handler, with this answer.
            self._listener.record_rejection(
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
        self._close()

    @cython.cfunc
    def _upgrade_requested(self, tail: bytes) -> None:
        # llhttp stops at the end of an upgrade request's head (on_headers_complete has
        # started or queued it already); what follows is the client's first tunnel bytes,
        # kept until the upstream agrees to switch.
        request, self._upgrading = self._upgrading, None
        if request is None or self.closed:
            self._close()
            return
        if not request.upgrade:
            # Not a WebSocket: an ordinary request whose Upgrade offer we do not pass on.
            if request.has_body:
                self.reject(400, "upgrade offer with a request body")
                return
            self._continue_as_http(tail)
            return
        self._pause(_UPGRADE_PAUSE)
        self._early_tunnel_bytes = tail
        if request is not self._current:
            self.reject(400, "upgrade while a request is in flight", request)

    @cython.cfunc
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


async def _run(conn: ClientEngine, request: Any, work: Any) -> None:
    """``serve_async``'s task: the coroutine, then the request's end (or its crash)."""
    try:
        await work
    except Exception:
        conn.request_crashed(request)
        return
    conn.request_done(request)


class ClientConnection(ClientEngine, asyncio.Protocol):
    """One client socket. ``handler(conn, request)`` answers: it returns a coroutine to run,
    or None when it answers by callbacks and calls ``request_done`` itself. Its deadlines
    run on ``sweeper``'s clock: the loop's shared one unless a test injects its own.

    The engine (``ClientEngine``) does the work; this class is what asyncio and the
    pipeline see, with the attributes they read on every request as plain ones."""

    def __init__(self, listener: Any, sweeper: Sweeper | None = None) -> None:
        ClientEngine.__init__(self, listener, sweeper)
        self.listener = listener
        self.loop = asyncio.get_running_loop()
        self.peer = ""
        self.scheme = listener.scheme


def _parser_reason(error: Exception) -> str:
    text = str(error).lower()
    if "content-length" in text or "transfer-encoding" in text or "chunk" in text:
        return "ambiguous or invalid message framing"
    if "method" in text:
        return "invalid method"
    if "header" in text:
        return "invalid header"
    return "malformed request"
