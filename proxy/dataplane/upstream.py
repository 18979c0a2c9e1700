"""Our side of upstream connections: an httptools response parser per connection (its
callbacks: ``ResponseReader``, http/response_head.py, compiled) and a per-server pool of
idle ones.

Theory of operation. An ``UpstreamConnection`` carries one exchange at a time (we never
pipeline to upstreams). ``begin(request_is_head, waiter)`` starts one: the waiter is told
``head_received(ResponseHead)`` or ``head_failed(UpstreamError)``, always after the parser
has returned (never from inside an llhttp callback), so it may attach a sink, finish, and
even hand this connection to the next exchange. The pipeline's exchange is such a waiter
itself; coroutines (the cache's background revalidation) use ``HeadFuture``. Body bytes that
arrive before the forwarding code attaches a ``sink`` are held (bounded: reading pauses past
``HELD_BODY_LIMIT``), then handed over in order; the sink hears ``on_end`` once, when it is
attached and the body is complete. A connection goes back to the pool only after a complete,
well-framed exchange whose response allowed keep-alive and whose request body was sent in
full; anything else closes it.

Interim responses. A 1xx other than 101 is not the response: the next head follows on the
same connection, and the waiter hears only that final one. The exchange's listener, when
forwarding gives one (``begin``), hears each 1xx but 100 (the proxy answers
``Expect`` itself) as ``interim_received(head)``, from inside the parser, so that it goes out
before the final head: it may only write it on. Interim heads count against the response
head limit, checked as each is parsed, so that what an upstream can make us relay before
its answer stays bounded.

Framing. Transfer-Encoding is accepted only as a lone ``chunked`` on an HTTP/1.1 response,
as on the request side: any other coding (RFC 9112 6.3 would read the body to the close,
still coded in a way we cannot undo for a client that never asked for it) is a malformed
response, as is Transfer-Encoding in HTTP/1.0 (RFC 9112 6.1: faulty framing).

Failures carry the phase in which they happened (``UpstreamError.kind``): ``error`` (refused,
reset, closed before a full head), ``timeout`` (connect or read), ``invalid_header``
(malformed head). ``sent`` tells whether request bytes left us, which decides retry safety.

Deadlines. Each wait for the upstream (the connect, the head, every gap in the body) is
bounded by ``timeouts.connect``/``timeouts.read`` and, whichever comes first, by the
exchange's ``budget_end``: the instant (loop clock) its ``retry.timeout`` runs out, as
Envoy's route timeout bounds the whole exchange. A wait cut short by the budget fails as
a ``timeout`` with ``budget_spent`` set, which no retry follows.

Compiled (proxy/compiled.py), ``UpstreamConnection`` and ``ConnectionPool`` are extension
types: the exchange's state is C fields, and the per-read work (slicing, the parser's
callbacks, the exchange's end, the pool's take and release) runs no interpreted bytecode.
An extension type cannot inherit ``asyncio.Protocol``, and asyncio does not need it (a
protocol is whatever has its methods); the reading pauses (dataplane/flow.py) and writes
are this class's own, on its C fields. The fields the
pipeline reads (``complete``, ``closed``, ``loop``, ``transport``) are getset descriptors
there, read a few times a request; ``ResponseHead``, read many times, stays a Python class
(dataplane/response.py).
"""

from __future__ import annotations

import asyncio
import collections
import math
import ssl
from typing import Any

import httptools

try:
    import cython
except ModuleNotFoundError:  # run as Python where Cython is not installed
    from proxy import cythonshim as cython

from proxy.balancing.retry import FailureKind
from proxy.dataplane.flow import PauseReason
from proxy.dataplane.response import ResponseHead
from proxy.dataplane.timers import sweeper_for
from proxy.http.chunkline import ChunkedScanner
from proxy.http.response_head import ResponseReader

__all__ = [
    "ConnectionPool",
    "HeadFuture",
    "ResponseHead",
    "UpstreamConnection",
    "UpstreamError",
    "client_ssl_context",
]

RESPONSE_HEAD_LIMIT = 64 * 1024
HELD_BODY_LIMIT = 256 * 1024
POOL_IDLE_SECONDS = 60.0
WRITE_HIGH_WATER = 256 * 1024
TIMER_SLACK = 0.002

_ssl_context: ssl.SSLContext | None = None


def client_ssl_context() -> ssl.SSLContext:
    """Verified TLS to https:// upstreams (system trust store, hostname checked)."""
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = ssl.create_default_context()
    return _ssl_context


# Module constants: a lookup on the enum class costs a dict probe each time.
_ERROR = FailureKind.ERROR
_TIMEOUT = FailureKind.TIMEOUT
_INVALID_HEADER = FailureKind.INVALID_HEADER
_HELD = PauseReason.HELD
_UPSTREAM_PAUSE = PauseReason.UPSTREAM


class UpstreamError(Exception):
    """An attempt failed before a usable response head: ``kind`` is a retry.on word."""

    def __init__(
        self, kind: FailureKind, detail: str, *, sent: bool, budget_spent: bool = False
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.sent = sent
        self.budget_spent = budget_spent  # cut by the retry time budget: retry nowhere


class _HeadResponseDone(Exception):
    """Raised from the parser callback to stop after a HEAD response's head (see below)."""


class _ResponseAfterResponse(Exception):
    """Raised from the parser callback when a second response follows a complete one in
    the same read: we never pipeline, so the upstream is out of step."""


class HeadFuture(asyncio.Future):
    """The waiter a coroutine awaits: resolves with the response head or the failure."""

    def head_received(self, response: ResponseHead) -> None:
        if not self.done():
            self.set_result(response)

    def head_failed(self, error: UpstreamError) -> None:
        if not self.done():
            self.set_exception(error)


# Compiled, the two scans of a read's head are C loops: bytes.find parses its arguments
# from a tuple (about 900 instructions a call, more than a head's whole scan).


@cython.cfunc
@cython.locals(i=cython.Py_ssize_t, last=cython.Py_ssize_t, byte=cython.uchar)
def _head_end(data: bytes, start: cython.Py_ssize_t, size: cython.Py_ssize_t) -> cython.Py_ssize_t:
    """Where the first CRLFCRLF at or after ``start`` begins, or -1."""
    if cython.compiled:
        i = start
        last = size - 4
        while i <= last:
            byte = data[i + 3]
            if byte == 10:  # LF: a CRLFCRLF may end here
                if data[i] == 13 and data[i + 1] == 10 and data[i + 2] == 13:
                    return i
                i += 1
            elif byte == 13:
                i += 1
            else:  # neither CR nor LF: no CRLFCRLF holds this byte, skip past it
                i += 4
        return -1
    return data.find(b"\r\n\r\n", start)


@cython.cfunc
@cython.locals(i=cython.Py_ssize_t, last=cython.Py_ssize_t, byte=cython.uchar)
def _interim_or_chunked(
    data: bytes, start: cython.Py_ssize_t, end: cython.Py_ssize_t
) -> cython.bint:
    """Is the head ``data[start:end]`` an interim (1xx) one, or does "chunked" (any case)
    occur in it? Either way the read is sliced at its end."""
    if cython.compiled:
        if start + 9 < end and data[start + 9] == 49:  # "HTTP/1.1 1": a 1xx status
            return True
        # Horspool over "chunked": the window's last byte, lower-cased, says how far to move.
        i = start
        last = end - 7
        while i <= last:
            byte = data[i + 6] | 0x20
            if byte == 100:  # d
                if (
                    data[i] | 0x20 == 99
                    and data[i + 1] | 0x20 == 104
                    and data[i + 2] | 0x20 == 117
                    and data[i + 3] | 0x20 == 110
                    and data[i + 4] | 0x20 == 107
                    and data[i + 5] | 0x20 == 101
                ):
                    return True
                i += 7
            elif byte == 101:  # e
                i += 1
            elif byte == 107:  # k
                i += 2
            elif byte == 110:  # n
                i += 3
            elif byte == 117:  # u
                i += 4
            elif byte == 104:  # h
                i += 5
            elif byte == 99:  # c
                i += 6
            else:
                i += 7
        return False
    head = data[start:end]
    return head[9:10] == b"1" or head.lower().find(b"chunked") >= 0


@cython.final
@cython.cclass
class UpstreamConnection:
    """The asyncio protocol of one upstream connection, and its exchange (see above)."""

    pool = cython.declare(object, visibility="readonly")
    transport = cython.declare(object, visibility="readonly")
    loop = cython.declare(object, visibility="readonly")
    _sweeper = cython.declare(object)
    deadline = cython.declare(cython.double, visibility="public")  # the sweeper's to clear
    read_timeout = cython.declare(cython.double, visibility="public")
    _reader = cython.declare(object)
    _parser = cython.declare(object)
    closed = cython.declare(cython.bint, visibility="readonly")
    # It sent what no request of ours asked for: never reused.
    out_of_step = cython.declare(cython.bint, visibility="readonly")
    _chunks = cython.declare(object)
    _head_tail = cython.declare(bytes)  # the last bytes of a head still open when a read ended
    # Switched protocols (start_tunnel): raw bytes both ways from then on, never reused.
    upgraded = cython.declare(cython.bint, visibility="readonly")
    # The exchange (see _reset_exchange).
    waiter = cython.declare(object, visibility="readonly")
    _done = cython.declare(object)
    failure = cython.declare(object, visibility="readonly")
    sink = cython.declare(object, visibility="readonly")
    _response = cython.declare(object)
    _held = cython.declare(list)
    _held_bytes = cython.declare(cython.Py_ssize_t)
    _head_bytes = cython.declare(cython.Py_ssize_t)
    _head_done = cython.declare(cython.bint)
    _head_untold = cython.declare(cython.bint)
    _end_told = cython.declare(cython.bint)
    _informational = cython.declare(cython.bint)
    interim_listener = cython.declare(object, visibility="readonly")
    complete = cython.declare(cython.bint, visibility="readonly")
    request_is_head = cython.declare(cython.bint, visibility="readonly")
    request_complete = cython.declare(cython.bint, visibility="readonly")
    budget_end = cython.declare(cython.double, visibility="readonly")
    _feeding_from = cython.declare(object)
    _reading_paused_for = cython.declare(set)
    tunnel_data = cython.declare(bytes, visibility="readonly")

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport = None
        self.loop = asyncio.get_running_loop()
        self._sweeper = sweeper_for(self.loop)
        self.deadline = 0.0
        self.read_timeout = pool.read_timeout
        self._reader = ResponseReader(self, RESPONSE_HEAD_LIMIT)
        self._parser = self._reader.new_parser(httptools.HttpResponseParser)
        self.closed = False
        self.out_of_step = False
        self._chunks = ChunkedScanner(trailer_limit=RESPONSE_HEAD_LIMIT)
        self._head_tail = b""
        self.upgraded = False
        self._held = []
        self._reading_paused_for = set()
        self._reset_exchange()

    @cython.cfunc
    def _reset_exchange(self) -> None:
        self.waiter = None  # None while idle in the pool
        # Made only when someone has to wait for the body's end (most bodies are complete
        # by the time the head is handled); ``failure`` records a failed exchange.
        self._done = None
        self.failure = None
        self.sink = None
        self._response = None
        if self._held:
            self._held = []
        self._held_bytes = 0
        self._head_bytes = 0
        self._reader.new_exchange()
        self._head_done = False
        self._head_untold = False  # parsed, not yet handed to the waiter
        self._end_told = False
        self._informational = False
        self.interim_listener = None  # hears 1xx heads but 100 (set by forwarding)
        self.complete = False
        self.request_is_head = False
        self.request_complete = False  # the whole request body left us (request_sent)
        self.budget_end = math.inf  # no read wait runs past this (loop clock), see begin()
        # The client whose body we send: while we cannot write it fast enough, that client
        # is not read (backpressure, ``feed_from``).
        self._feeding_from = None
        if self._reading_paused_for:
            self._reading_paused_for = set()
        self.tunnel_data = b""
        if self._chunks.active:  # a chunked response cut short; most never began one
            self._chunks.stop()
        self._head_tail = b""

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        self._sweeper.watch(self, precise=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._sweeper.unwatch(self)
        self.pool.forget(self)
        if self.waiter is None:
            return
        if self.upgraded:  # a tunnel the upstream (or its idle timeout) ended
            if self.sink is not None:
                self.sink.on_end()
            return
        if not self._head_done:
            self._fail(
                UpstreamError(_ERROR, "upstream closed before a full response head", sent=True)
            )
        elif not self.complete:
            response = self._response
            close_delimited = (
                response is not None
                and response.has_body
                and response.content_length is None
                and not response.chunked
                and not response.upgrade
            )
            if close_delimited:
                self._finish()
            else:
                self._abort(UpstreamError(_ERROR, "upstream closed mid-response", sent=True))

    def eof_received(self) -> bool | None:
        """The peer's half-close: the transport closes (connection_lost tells the rest)."""
        return None

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            # Bytes on an idle connection: the peer is out of step; never reuse it.
            self.close()
            return
        if self.upgraded:  # raw bytes go straight through
            self.deadline = self._sweeper.now + self.read_timeout
            self.sink.on_body(data)
            return
        deadline: cython.double = self.loop.time() + self.read_timeout  # fresh, see begin()
        if deadline >= self.budget_end:
            deadline = self.budget_end
            if deadline < self._sweeper.next_sweep:
                self._sweeper.fire_at(self, deadline)
        self.deadline = deadline
        size: cython.Py_ssize_t = len(data)
        if not self._head_done:
            # Checked after parsing: body bytes read together with the head do not count.
            self._head_bytes += size
        start: cython.Py_ssize_t = 0
        end: cython.Py_ssize_t
        while start < size:
            end = self._slice_end(data, start, size)
            if end < 0:
                break
            try:
                self._parser.feed_data(
                    data if start == 0 and end == size else memoryview(data)[start:end]
                )
            except (httptools.HttpParserUpgrade, httptools.HttpParserError) as stop:
                self._parsing_stopped(stop, data, start)
                break
            start = end
        if not self._head_done:
            self._head_tail = (self._head_tail + data[-3:])[-3:]
            if self._head_bytes > RESPONSE_HEAD_LIMIT and not self.closed:
                self._fail(UpstreamError(_INVALID_HEADER, "response head too large", sent=True))
                self.close()
            return
        # Outside the parser now: the waiter may finish, and even begin the next exchange.
        if self._head_untold:
            self._head_untold = False
            self.waiter.head_received(self._response)
        elif self.complete:
            self._tell_end()

    @cython.cfunc
    def _slice_end(
        self, data: bytes, start: cython.Py_ssize_t, size: cython.Py_ssize_t
    ) -> cython.Py_ssize_t:
        """Where to stop feeding the parser: at the end of each head, so a chunked body
        starts a slice and its scanner (http/chunkline.py) walks it ahead of the parser; else
        at the end of the read. -1: the scanner refused the body."""
        scanner = self._chunks
        if scanner.active:
            refused, body_end = scanner.scan(data, start, size)
            if refused is not None:
                self._framing_refused(refused)
                return -1
            return size if body_end < 0 else body_end
        if self._head_done:
            return size
        tail: bytes = self._head_tail
        found: cython.Py_ssize_t
        if tail and start == 0:
            # A head begun in an earlier read may end with a CRLFCRLF that straddles reads.
            found = (tail + data[:3]).find(b"\r\n\r\n")
            if found >= 0:
                return found + 4 - len(tail)
        found = _head_end(data, start, size)
        if found < 0:
            return size
        if not _interim_or_chunked(data, start, found):
            return size  # a final head (not 1xx) and no chunked body: the rest is its body
        return found + 4

    @cython.cfunc
    def _parsing_stopped(self, stop: Any, data: bytes, start: cython.Py_ssize_t) -> None:
        """The parser stopped in the slice of ``data`` from ``start``: the rest of the read
        is not parsed."""
        if isinstance(stop, httptools.HttpParserUpgrade):
            self.tunnel_data = data[start + stop.args[0] :]
        elif isinstance(stop, httptools.HttpParserCallbackError):
            cause = stop.__context__
            if isinstance(cause, _HeadResponseDone):
                # HEAD: httptools cannot be told to skip the announced body, so we stop the
                # parser after the head and start a fresh one for the next exchange.
                self._parser = self._reader.new_parser(httptools.HttpResponseParser)
                self._finish()
            elif isinstance(cause, _ResponseAfterResponse):
                # The complete response before it stands; what followed is dropped, never
                # relayed (it would desynchronise the client) nor left for the next request.
                self.out_of_step = True
            else:
                self._parser_failed(stop)
        else:
            self._parser_failed(stop)

    @cython.cfunc
    def _framing_refused(self, reason: str) -> None:
        """A chunk-size line or trailer section past its bound: a malformed response."""
        if self._head_untold:
            # Nothing of it has been relayed yet: the exchange fails as a bad head would
            # (502, or a retry), rather than relaying a head whose body must then be cut.
            self._head_untold = False
            self._head_done = False
            self._fail(UpstreamError(_INVALID_HEADER, f"malformed response: {reason}", sent=True))
        else:
            self._abort(UpstreamError(_ERROR, f"malformed response body: {reason}", sent=True))
        self.close()

    @cython.cfunc
    def _parser_failed(self, error: Any) -> None:
        if not self._head_done:
            self._fail(UpstreamError(_INVALID_HEADER, f"malformed response: {error}", sent=True))
        else:
            self._abort(UpstreamError(_ERROR, f"malformed response body: {error}", sent=True))
        self.close()

    def pause_writing(self) -> None:
        if self._feeding_from is not None:
            self._feeding_from.pause_reading(_UPSTREAM_PAUSE)

    def resume_writing(self) -> None:
        if self._feeding_from is not None:
            self._feeding_from.resume_reading(_UPSTREAM_PAUSE)

    # -- reading paused for named reasons (dataplane/flow.py), writes, close ------------------

    @cython.ccall
    def pause_reading(self, reason: PauseReason) -> None:
        if not self._reading_paused_for and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._reading_paused_for.add(reason)

    @cython.ccall
    def resume_reading(self, reason: PauseReason) -> None:
        if reason in self._reading_paused_for:
            self._reading_paused_for.discard(reason)
            if not self._reading_paused_for and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def reading_paused(self) -> bool:
        """Whether any reason holds reading paused."""
        return bool(self._reading_paused_for)

    @cython.ccall
    def resume_all_reading(self) -> None:
        if self._reading_paused_for:
            self._reading_paused_for.clear()
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    @cython.ccall
    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def write_after(self, head: bytes, data: bytes) -> None:
        """``head`` then ``data`` in one system call (small ones joined, large ones writev)."""
        if not self.closed:
            if len(data) <= 4096:
                self.transport.write(head + data)
            else:
                self.transport.writelines((head, data))

    @cython.ccall
    def close(self) -> None:
        """Close after what is buffered has been written."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping what is buffered (a reset for the peer)."""
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    # -- the head, as ResponseReader (http/response_head.py) passes it on -------------------

    def message_begun(self) -> ResponseHead:
        """A message begins: the response head it is read into."""
        if self.complete:
            raise _ResponseAfterResponse
        response = self._response = ResponseHead()
        return response

    def head_parsed(self, response: ResponseHead, interim: cython.bint) -> None:
        """``response``'s head passed every check of the reader."""
        if interim:
            self._informational = True  # an interim response: the final head follows
            return
        response.has_body = not (
            self.request_is_head or response.status in (204, 304) or response.upgrade
        )
        self._head_done = True
        self._head_untold = True
        if self.request_is_head:
            raise _HeadResponseDone
        if response.chunked and response.has_body:
            self._chunks.begin()  # at the next byte: the slice ends with this head

    # -- the body, and the end of the message (llhttp, through the reader) -----------------

    def on_body(self, chunk: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.on_body(chunk)
            return
        self._held.append(chunk)
        self._held_bytes += len(chunk)
        if self._held_bytes > HELD_BODY_LIMIT:
            self.pause_reading(_HELD)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            listener = self.interim_listener
            if listener is not None and self._response.status != 100:
                listener.interim_received(self._response)
            return
        self.complete = True  # told after the parser returns (data_received)
        self.deadline = 0.0
        if self._chunks.active:  # it saw the end too; this keeps the two in step regardless
            self._chunks.stop()

    # -- the exchange, driven by forwarding ----------------------------------------------

    def begin(
        self,
        request_is_head: cython.bint,
        waiter: Any,
        budget_end: cython.double = math.inf,
        interim_listener: Any = None,
    ) -> None:
        """Start an exchange; ``waiter`` hears head_received(head) or head_failed(error).
        ``budget_end``: when its retry time budget runs out (loop clock), if known yet.
        ``interim_listener.interim_received(head)`` hears each 1xx but 100, if given."""
        self._reset_exchange()
        self.request_is_head = request_is_head
        self.waiter = waiter
        self.interim_listener = interim_listener
        # The loop's clock, not the sweeper's tick-cached one: a stale `now` fires the
        # timeout early.
        self.deadline = self.loop.time() + self.read_timeout
        self.limit_exchange(budget_end)

    def feed_from(self, client: Any) -> None:
        """What this exchange sends comes from ``client`` as it arrives (a streamed body,
        a tunnel): while the upstream cannot take it, ``client`` is not read."""
        self._feeding_from = client

    @cython.ccall
    def limit_exchange(self, budget_end: cython.double) -> None:
        """No wait of this exchange runs past ``budget_end`` (loop clock) from now on."""
        if budget_end >= self.budget_end:
            return
        self.budget_end = budget_end
        if self.deadline > budget_end and not self.complete and self.failure is None:
            self.deadline = budget_end
            if budget_end < self._sweeper.next_sweep:
                self._sweeper.fire_at(self, budget_end)

    def attach(self, sink: Any) -> None:
        """Hand the response body to ``sink`` (on_body/on_end/on_abort), held bytes first."""
        self.sink = sink
        if self._held:
            for chunk in self._take_held_chunks():
                sink.on_body(chunk)
        if self.complete:
            self._tell_end()
        elif self.failure is not None:
            sink.on_abort(self.failure)

    def take_held(self) -> bytes:
        """The body bytes held so far (all of it, once ``complete``), handed over once."""
        held: list = self._take_held_chunks()
        if len(held) == 1:
            return held[0]
        return b"".join(held)

    @cython.cfunc
    def _take_held_chunks(self) -> list:
        held: list = self._held
        self._held = []
        self._held_bytes = 0
        if self._reading_paused_for:
            self.resume_reading(_HELD)  # a full hold stopped reading: it is empty now
        return held

    def wait_done(self) -> Any:
        """Until the response body has ended (an awaitable); raises the UpstreamError that
        ended it early."""
        return _wait_done(self)

    @cython.ccall
    def done_future(self) -> Any:
        """The future ``wait_done`` awaits while the body has neither ended nor failed."""
        if self._done is None:
            self._done = self.loop.create_future()
        return self._done

    def send_request(self, data: bytes) -> None:
        """Write the whole request (head and any body) at once."""
        if not self.closed:
            self.transport.write(data)
        self.request_complete = True

    def request_sent(self) -> None:
        """The last byte of a streamed request body has been written."""
        self.request_complete = True

    @cython.ccall
    def go_idle(self) -> None:
        """Back in the pool: reading on, the exchange's references dropped."""
        # Paused for the client's sake (a slow reader of the last response)? An idle
        # connection must read again, or its next exchange would never see the response
        # (begin() starts from an empty set of reasons).
        if self._reading_paused_for:
            self.resume_all_reading()
        # Idle is `waiter is None`; begin() resets the rest. Drop what holds memory.
        self.waiter = None
        self.sink = None
        self.interim_listener = None
        self._response = None
        self._feeding_from = None
        self.deadline = self._sweeper.now + POOL_IDLE_SECONDS

    def start_tunnel(self, sink: Any) -> None:
        self.sink = sink
        self.upgraded = True
        pending: bytes = self.tunnel_data
        self.tunnel_data = b""
        # An idle tunnel (no bytes either way, see tunnel_activity) ends after read_timeout;
        # the retry time budget bounded the exchange that opened it, not the tunnel.
        self.budget_end = math.inf
        self.deadline = self._sweeper.refresh() + self.read_timeout
        if pending:
            sink.on_body(pending)

    def tunnel_activity(self) -> None:
        """Bytes went through the tunnel from the client: it is not idle."""
        self.deadline = self._sweeper.now + self.read_timeout

    def on_deadline(self) -> None:
        if self.waiter is None:
            self.close()  # idle too long in the pool
            return
        if self.upgraded:
            self.close()  # idle tunnel: connection_lost tells the sink
            return
        # Timers fire to the millisecond (uvloop truncates): that close, the budget is out.
        if self.loop.time() >= self.budget_end - TIMER_SLACK:
            error = UpstreamError(
                _TIMEOUT,
                "retry.timeout spent waiting for the upstream",
                sent=True,
                budget_spent=True,
            )
        else:
            error = UpstreamError(_TIMEOUT, "upstream read timed out", sent=True)
        if not self._head_done:
            self._fail(error)
        else:
            self._abort(error)
        self.close()

    @cython.cfunc
    def _fail(self, error: UpstreamError) -> None:
        """The exchange failed before a usable head: the waiter hears the first failure."""
        first: cython.bint = self.failure is None and not self.complete
        self._abort(error)
        if first and self.waiter is not None and not self._head_done:
            self.waiter.head_failed(error)

    @cython.cfunc
    def _abort(self, error: UpstreamError) -> None:
        if self.failure is not None or self.complete:
            return
        self.failure = error
        done = self._done
        if done is not None and not done.done():
            done.set_exception(error)
        if self.sink is not None:
            self.sink.on_abort(error)

    @cython.cfunc
    def _finish(self) -> None:
        self.complete = True
        self.deadline = 0.0
        if self._head_untold:
            self._head_untold = False
            self.waiter.head_received(self._response)
        else:
            self._tell_end()

    @cython.cfunc
    def _tell_end(self) -> None:
        """The body is complete: the sink hears it once, whenever it is attached."""
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)
        sink = self.sink
        if sink is not None and not self._end_told:
            self._end_told = True
            sink.on_end()

    @property
    def reusable(self) -> bool:
        return self._reusable()

    @cython.cfunc
    def _reusable(self) -> cython.bint:
        response = self._response
        return (
            not self.closed
            and self.complete
            and response is not None
            and response.keep_alive
            and not response.upgrade
            and not self._held
            # an upstream that answered before reading our whole body is out of step
            and self.request_complete
            and not self.out_of_step
        )


async def _wait_done(conn: UpstreamConnection) -> None:
    """``UpstreamConnection.wait_done``: a coroutine function apart, as Cython builds one."""
    if conn.complete:
        return
    if conn.failure is not None:
        raise conn.failure
    await conn.done_future()


@cython.final
@cython.cclass
class ConnectionPool:
    """Idle keep-alive connections to one server, most recently used first."""

    _idle = cython.declare(object)  # a deque of UpstreamConnection
    _connect_to = cython.declare(object)
    closed = cython.declare(cython.bint, visibility="readonly")
    host = cython.declare(object, visibility="readonly")
    port = cython.declare(object, visibility="readonly")
    tls_name = cython.declare(object, visibility="readonly")
    tls = cython.declare(cython.bint, visibility="readonly")
    max_idle = cython.declare(cython.Py_ssize_t, visibility="readonly")
    connect_timeout = cython.declare(cython.double, visibility="readonly")
    read_timeout = cython.declare(cython.double, visibility="readonly")

    def __init__(
        self, server_cfg: Any, upstream_cfg: Any, *, connect_to: tuple[str, int] | None = None
    ) -> None:
        """``connect_to``: the address DNS discovery found for the URL's host, if any; TLS
        still names the URL's host (SNI, certificate check)."""
        self._idle = collections.deque()
        self._connect_to = connect_to
        self.closed = False
        self.reconfigure(server_cfg, upstream_cfg)

    def reconfigure(self, server_cfg: Any, upstream_cfg: Any) -> None:
        self.host, self.port = self._connect_to or (server_cfg.host, server_cfg.port)
        self.tls_name = server_cfg.host
        self.tls = server_cfg.scheme == "https"
        self.max_idle = upstream_cfg.keepalive
        self.connect_timeout = upstream_cfg.timeouts.connect
        self.read_timeout = upstream_cfg.timeouts.read
        while len(self._idle) > self.max_idle:
            self._idle.popleft().close()

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def take_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        conn: UpstreamConnection
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.read_timeout = self.read_timeout
                return conn
        return None

    async def connect(self, budget_left: float = math.inf) -> UpstreamConnection:
        """A new connection, within ``timeouts.connect`` and the ``budget_left`` seconds of
        the exchange's retry time budget, whichever is shorter."""
        loop = asyncio.get_running_loop()
        timeout = self.connect_timeout
        clipped = budget_left < timeout
        if clipped:
            if budget_left <= 0:
                raise UpstreamError(
                    _TIMEOUT,
                    "retry.timeout spent before connecting",
                    sent=False,
                    budget_spent=True,
                )
            timeout = budget_left
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self),
                    self.host,
                    self.port,
                    ssl=client_ssl_context() if self.tls else None,
                    server_hostname=self.tls_name if self.tls else None,
                )
        except TimeoutError:
            if clipped:
                raise UpstreamError(
                    _TIMEOUT, "retry.timeout spent while connecting", sent=False, budget_spent=True
                ) from None
            raise UpstreamError(_TIMEOUT, "connect timed out", sent=False) from None
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise UpstreamError(_ERROR, f"connect failed: {reason}", sent=False) from None
        return conn

    def connect_then(self, budget_left: float, listener: Any) -> None:
        """``connect`` by callback: ``listener.connected(conn)`` or
        ``listener.connect_failed(error)``, on a later loop turn."""
        task = asyncio.get_running_loop().create_task(self.connect(budget_left))
        task.add_done_callback(_ConnectCall(listener).done)

    def release(self, conn: UpstreamConnection) -> None:
        if conn._reusable() and len(self._idle) < self.max_idle and not self.closed:
            # Paused for the client's sake (a slow reader of the last response)? An idle
            # connection must read again, or its next exchange would never see the
            # response (begin() starts from an empty set of reasons).
            conn.go_idle()
            self._idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def close_idle(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def close(self) -> None:
        """The server is gone: idle connections close now, busy ones when released."""
        self.closed = True
        self.close_idle()


class _ConnectCall:
    """Tells a ``connect_then`` listener how its connect ended."""

    __slots__ = ("listener",)

    def __init__(self, listener: Any) -> None:
        self.listener = listener

    def done(self, task: asyncio.Task[UpstreamConnection]) -> None:
        if task.cancelled():  # the loop is shutting down: nobody is waiting any more
            return
        error = task.exception()
        if error is None:
            self.listener.connected(task.result())
        elif isinstance(error, UpstreamError):
            self.listener.connect_failed(error)
        else:  # not a connect failure: a bug, which the listener reports as one
            self.listener.connect_crashed(error)
