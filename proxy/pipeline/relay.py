"""Bodies on their way: the client's to the upstream (``send_request``, ``BodyWriter``),
the upstream's to the client (``start_relay``, ``ResponseRelay``), and a failed response's
held while small (``Collector``). Backpressure both ways: the side that cannot keep up
stops us reading the other (the owners' ``feed_from`` / ``relay_from``)."""

from __future__ import annotations

from typing import Any

from proxy.pipeline.answer import with_trace
from proxy.pipeline.framing import CHUNK_END, response_head

LAST_RESPONSE_LIMIT = 64 * 1024


def send_request(
    upstream: Any,
    request: Any,
    head_bytes: bytes,
    downstream: Any,
    *,
    chunked: bool,
    budget: float | None,
) -> None:
    """``budget``: ``retry.timeout``, counted from the end of a body that streams."""
    body = request.body
    if body is None:
        upstream.send_request(head_bytes)
        return
    if body.complete and not chunked:  # held in full (kept for a replay), or just complete
        upstream.send_request(head_bytes + b"".join(body.chunks))
        return
    writer = BodyWriter(upstream, head_bytes, chunked, budget)
    # Backpressure: an upstream that cannot take the body fast enough stops us reading it.
    upstream.feed_from(downstream)
    body.stream_to(writer)


class Reframed:
    """Body chunks to ``out`` as they arrive, re-framed: chunked, or as they are.

    The head waits for the first body bytes, so that a body that came with its head (most
    do) leaves with it in one system call. Both directions stream through one of these.
    """

    __slots__ = ("bytes_out", "chunked", "head", "out")

    def __init__(self, out: Any, head: bytes, chunked: bool) -> None:
        self.out = out
        self.head: bytes | None = head
        self.chunked = chunked
        self.bytes_out = 0

    def on_body(self, chunk: bytes) -> None:
        self.bytes_out += len(chunk)
        data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked else chunk
        head = self.head
        if head is None:
            self.out.write(data)
        else:
            self.head = None
            self.out.write_after(head, data)

    def write_end(self) -> None:
        """The body is over: what is still owed (the head, the last chunk) goes out."""
        head, self.head = self.head, None
        tail = CHUNK_END if self.chunked else b""
        if head is not None:
            self.out.write(head + tail)
        elif tail:
            self.out.write(tail)


class BodyWriter(Reframed):
    """The client's body to the upstream, with backpressure (see ``send_request``).

    The request is complete when its body ends: the retry time budget (``budget``
    seconds, None for none) starts bounding the exchange then.
    """

    __slots__ = ("budget",)

    def __init__(self, out: Any, head: bytes, chunked: bool, budget: float | None) -> None:
        super().__init__(out, head, chunked)
        self.budget = budget

    def on_end(self) -> None:
        self.write_end()
        upstream = self.out
        upstream.request_sent()
        if self.budget is not None:
            upstream.limit_exchange(upstream.loop.time() + self.budget)


class ResponseRelay(Reframed):
    """The upstream's body to the client, with backpressure the other way.

    ``flush_head`` sends the head alone when the body is not there yet.
    """

    __slots__ = ("close", "listener")

    def __init__(
        self, downstream: Any, chunked: bool, head: bytes, close: bool, listener: Any
    ) -> None:
        super().__init__(downstream, head, chunked)
        self.close = close  # the client connection closes after this response
        self.listener = listener  # relay_ended() / relay_failed(error), or None

    def on_end(self) -> None:
        self.write_end()
        if self.listener is not None:
            self.listener.relay_ended(self)

    def flush_head(self) -> None:
        head, self.head = self.head, None
        if head is not None:
            self.out.write(head)

    def on_abort(self, error: Exception) -> None:
        if self.listener is not None:
            self.listener.relay_failed(self, error)
        # else the failure reaches whoever awaits upstream.wait_done()


class FilteredRelay(ResponseRelay):
    """The upstream's body coded on the way (``compress``: each chunk flushed as it comes),
    and/or copied as it leaves to ``tap`` (the cache's ``BodyWriter``)."""

    __slots__ = ("encoder", "tap")

    def __init__(
        self,
        downstream: Any,
        chunked: bool,
        head: bytes,
        close: bool,
        listener: Any,
        encoder: Any,
        tap: Any,
    ) -> None:
        super().__init__(downstream, chunked, head, close, listener)
        self.encoder = encoder
        self.tap = tap

    def on_body(self, chunk: bytes) -> None:
        if self.encoder is not None:
            chunk = self.encoder.compress(chunk)
            if not chunk:  # an empty chunk would end chunked framing
                return
        if self.tap is not None and not self.tap.write(chunk):
            self.tap = None  # too large to store: it only streams through
        super().on_body(chunk)

    def on_end(self) -> None:
        if self.encoder is not None:
            tail = self.encoder.finish()
            if tail:
                if self.tap is not None:
                    self.tap.write(tail)
                super().on_body(tail)
        super().on_end()


def start_relay(
    ex: Any, response: Any, upstream: Any, listener: Any = None, tap: Any = None
) -> ResponseRelay:
    """Send the response head (with the first body bytes) and stream the rest as it comes.
    ``listener`` hears the end; without one, await ``upstream.wait_done()``. Call
    ``relay_over`` once it has ended, either way."""
    conn = ex.conn
    request = ex.request
    close = not request.keep_alive or conn.listener.shutting_down
    encoder = None
    compression = ex.route_runtime.compression
    if compression is not None and (response.has_body or request.method == b"HEAD"):
        length = None if response.chunked else response.content_length
        encoder = compression.encoder_for(request, response, length)
    chunked_out = False
    if response.has_body and response.content_length is None:
        if request.version == "1.1":
            chunked_out = True
        else:
            close = True  # an HTTP/1.0 client reads to the end of the connection
    extra = with_trace(ex, ex.extra_headers + ex.sticky_cookie)
    head = response_head(response, request, extra, close=close, chunked=chunked_out)
    if encoder is None and tap is None:
        relay = ResponseRelay(conn, chunked_out, head, close, listener)
    else:
        relay = FilteredRelay(conn, chunked_out, head, close, listener, encoder, tap)
    conn.begin_response()
    ex.status = response.status
    # Backpressure: a client that cannot keep up stops us reading the upstream.
    conn.relay_from(upstream)
    upstream.attach(relay)  # may end the relay at once: the whole body is often here
    if relay.head is not None:
        relay.flush_head()
    return relay


def relay_over(ex: Any, relay: Any) -> None:
    ex.conn.relay_from(None)
    ex.bytes_out += relay.bytes_out
    if relay.close:
        ex.request.close_after()


class Collector:
    """A failed response's body, held while it stays under ``LAST_RESPONSE_LIMIT``: if no
    other server does better, it is the answer (with ``response``, its head).
    ``listener`` hears ``failed_body_held(self)`` or ``failed_body_lost(self, error)``."""

    __slots__ = ("chunks", "listener", "response", "size", "too_big")

    def __init__(self, listener: Any, response: Any) -> None:
        self.listener = listener
        self.response = response
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_big = False

    def on_body(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > LAST_RESPONSE_LIMIT:
            self.too_big = True
        else:
            self.chunks.append(chunk)

    def on_end(self) -> None:
        self.listener.failed_body_held(self)

    def on_abort(self, error: Exception) -> None:
        self.listener.failed_body_lost(self, error)
