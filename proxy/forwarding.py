"""The request pipeline: route -> rate limit -> select -> breaker -> attempt -> retry -> relay.

``handle(conn, request)`` is the one coroutine per request. It reads the config generation
(``Runtime``) once, so a reload never changes a request half-way. Every decision that can be
made from the config was made when the ``Runtime`` was built (routes, header sets, metric
children); here we only look things up.

Retry safety (nginx ``proxy_next_upstream`` semantics): an attempt that failed is tried again
on a server not yet tried while the failure word is listed in ``retry.on``, tries and the
time budget remain, nothing of the response has reached the client, the method may be
repeated, the request body (if any) is held in full so it can be replayed, and the retry
budget allows. A pooled connection the upstream closed while idle is a known race: such a
failure before any response byte is retried once on a fresh connection to the same server,
without spending a try, when the request can be replayed.
"""

from __future__ import annotations

import json
import math
import time
from functools import partial
from typing import Any

from proxy.http1 import REASONS, ClientConnection, Request, error_response
from proxy.pool import UpstreamConnection, UpstreamError
from proxy.routing import cookie_value

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
# Request headers we rewrite ourselves (framing, forwarding facts, 100-continue).
REQUEST_REWRITTEN = HOP_BY_HOP | {
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-sluicegate-trace",  # carries the admin token: never leaves the proxy
}
RESPONSE_REWRITTEN = HOP_BY_HOP | {b"content-length"}
LAST_RESPONSE_LIMIT = 64 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNK_END = b"0\r\n\r\n"


class Outcome:
    """What one request did; feeds the access log, metrics and the decision trace."""

    __slots__ = (
        "attempts",
        "bytes_out",
        "error",
        "rate_limited",
        "route",
        "server",
        "status",
        "trace",
        "tries",
        "upstream",
        "upstream_seconds",
    )

    def __init__(self) -> None:
        self.status = 0
        self.route = ""
        self.upstream = ""
        self.server = ""
        self.tries = 0
        self.error = ""
        self.rate_limited = False
        self.bytes_out = 0
        self.upstream_seconds = 0.0
        self.attempts: list[dict[str, Any]] = []
        self.trace: dict[str, Any] | None = None  # the decision trace, when asked for


async def handle(conn: ClientConnection, request: Request) -> None:
    runtime = conn.listener.runtime
    started = time.monotonic()
    outcome = Outcome()
    request_id = request.request_id or runtime.new_request_id()
    request.request_id = request_id
    route = runtime.router.match(request.method, request.host, request.path, request)
    if request.trace is not None and runtime.wants_trace(request):
        outcome.trace = {"route": route.name if route is not None else None, "retries": []}
    try:
        if route is None:
            _send_error(conn, request, 404, "no route matched", outcome)
        else:
            outcome.route = route.name
            await _serve_route(conn, request, route, runtime, outcome)
    finally:
        duration = time.monotonic() - started
        if route is not None:
            route.metrics.observe(request.method, outcome.status, duration)
        if runtime.access_log is not None:
            runtime.log_access(conn, request, outcome, duration)


async def _serve_route(
    conn: ClientConnection, request: Request, route: Any, runtime: Any, outcome: Outcome
) -> None:
    extra_headers = b""
    if route.rate_limit is not None:
        decision = await runtime.limiter.check(
            route.name, _limit_key(route, request, runtime), route.rate_limit
        )
        if outcome.trace is not None:
            outcome.trace["rate_limit"] = {
                "allowed": decision.allowed,
                "remaining": decision.remaining,
                "limit": decision.limit,
                "mode": route.rate_limit.mode,
                "backend_failed": decision.backend_failed,
            }
        if decision.backend_failed:
            # Redis failed and `allow`/`deny` decided without a bucket: no counts to tell, and
            # a `deny` is the limiter being down (503), not the client over its limit.
            if not decision.allowed and route.rate_limit.mode == "enforce":
                _send_error(conn, request, 503, "rate limiter unavailable", outcome)
                return
        else:
            extra_headers = _rate_limit_headers(decision)
            if not decision.allowed:
                outcome.rate_limited = True
                route.metrics.rate_limited()
                if route.rate_limit.mode == "enforce":
                    retry_after = b"Retry-After: %d\r\n" % max(1, math.ceil(decision.retry_after))
                    _send_error(
                        conn, request, 429, "rate limited", outcome, extra_headers + retry_after
                    )
                    return
    group = route.group
    outcome.upstream = group.name
    budget = group.retry_budget
    budget.request_started()
    try:
        await _forward(conn, request, route, group, runtime, outcome, extra_headers)
    finally:
        budget.request_finished()


def _limit_key(route: Any, request: Request, runtime: Any) -> str:
    kind = route.limit_key_kind
    if kind == "route":
        return ""
    if kind == "header":
        value = request.header(route.limit_key_name)
        if value:
            return "h:" + value.decode("latin-1")
    elif kind == "cookie":
        value = cookie_value(request.header(b"cookie"), route.limit_key_name)
        if value:
            return "c:" + value.decode("latin-1")
    return runtime.client_ip(request)


def _rate_limit_headers(decision: Any) -> bytes:
    return b"RateLimit-Limit: %d\r\nRateLimit-Remaining: %d\r\nRateLimit-Reset: %d\r\n" % (
        decision.limit,
        max(0, decision.remaining),
        math.ceil(decision.reset_after),
    )


async def _forward(
    conn: ClientConnection,
    request: Request,
    route: Any,
    group: Any,
    runtime: Any,
    outcome: Outcome,
    extra_headers: bytes,
) -> None:
    retry = group.retry_policy
    body = request.body
    ask = _RetryQuestion(retry, request)
    may_repeat = retry.tries > 1 and retry.may_retry_method(ask.method, ask.has_idempotency_key)
    if body is not None and may_repeat:
        if request.expect_continue:
            conn.write(CONTINUE)
        if request.content_length is None or request.content_length <= retry.max_body_bytes:
            try:
                ask.replayable = await body.buffer_up_to(retry.max_body_bytes)
            except (ConnectionError, OSError):
                outcome.status = 499
                outcome.error = "client went away"
                return
    elif body is not None and request.expect_continue:
        conn.write(CONTINUE)

    key = _hash_key(group, request, runtime)
    if outcome.trace is not None:
        outcome.trace["policy"] = group.config.policy
        outcome.trace["candidates"] = [
            {
                "server": server.label,
                "eligible": server.is_eligible(),
                "health": server.health_word(),
                "breaker": server.breaker.state.value,
                "draining": server.draining,
                "backup": server.backup,
            }
            for server in group.servers
        ]
    head_bytes = _request_head(conn, request, route)  # the same for every try
    ask.started = time.monotonic()
    tried: set[Any] = set()
    last_error: UpstreamError | None = None
    last_response: tuple[Any, bytes] | None = None
    holding_retry = False
    try:
        while True:
            server = group.select(key, tried)
            if server is None:
                break
            tried.add(server)
            if not server.breaker.acquire():
                continue
            outcome.tries += 1
            result = await _attempt(
                conn, request, head_bytes, group, server, outcome, extra_headers, ask
            )
            if holding_retry:
                group.retry_budget.release_retry()
                holding_retry = False
            if result is None:
                return  # answered (or the client went away)
            failure_word, error, response = result
            # A real upstream answer beats a later failure that has none to give.
            if response is not None:
                last_response = response
            elif error is not None:
                last_error = error
            else:  # a listed status whose body was too large to hold as the final answer
                last_error = UpstreamError(
                    "error", f"upstream answered {failure_word} (body too large to hold)", sent=True
                )
            if ask.refusal(failure_word, outcome.tries, conn.response_started) is not None:
                break
            if not group.retry_budget.try_acquire_retry():
                break
            holding_retry = True
            runtime.metrics.retry(group.name, failure_word)
            if outcome.trace is not None:
                outcome.trace["retries"].append(failure_word)
    finally:
        if holding_retry:
            group.retry_budget.release_retry()

    if conn.response_started or conn.closed:
        return
    if last_response is not None:
        head, payload = last_response
        _send_buffered(conn, request, head, payload, outcome, extra_headers)
    elif last_error is not None:
        status = 504 if last_error.kind == "timeout" else 502
        outcome.error = last_error.detail
        _send_error(conn, request, status, last_error.detail, outcome, extra_headers)
    else:
        _send_error(conn, request, 503, "no eligible server", outcome, extra_headers)


def _hash_key(group: Any, request: Request, runtime: Any) -> str | None:
    kind = group.hash_key
    if kind is None:
        return None
    if kind == "client_ip":
        return runtime.client_ip(request)
    source, _, name = kind.partition(":")
    if source == "header":
        value = request.header(name.lower().encode())
    else:
        value = cookie_value(request.header(b"cookie"), name.encode())
    return value.decode("latin-1") if value else runtime.client_ip(request)


class _RetryQuestion:
    """May this request go to another server? The per-request facts ``RetryPolicy`` needs,
    gathered once and asked both after a failed try and before holding a failed response."""

    __slots__ = ("has_idempotency_key", "method", "policy", "replayable", "started")

    def __init__(self, policy: Any, request: Request) -> None:
        self.policy = policy
        self.method = request.method.decode("latin-1")
        self.has_idempotency_key = request.header(b"idempotency-key") is not None
        self.replayable = request.body is None  # a body becomes replayable once held in full
        self.started = 0.0

    def refusal(self, word: str, attempts_done: int, response_started: bool) -> Any:
        """None when another try is allowed, else why not (a ``NoRetry``)."""
        return self.policy.should_retry(
            word,
            attempts_done=attempts_done,
            started_at=self.started,
            method=self.method,
            has_idempotency_key=self.has_idempotency_key,
            body_replayable=self.replayable,
            response_started=response_started,
        )


async def _attempt(
    conn: ClientConnection,
    request: Request,
    head_bytes: bytes,
    group: Any,
    server: Any,
    outcome: Outcome,
    extra_headers: bytes,
    ask: _RetryQuestion,
) -> tuple[str, UpstreamError | None, Any] | None:
    """One try on one server. None when the client has been answered (or is gone);
    otherwise (failure word, error or None, (head, body) of a failed response or None)."""
    server.in_flight += 1
    server.requests += 1
    metrics = server.metrics
    metrics.in_flight_inc()
    attempt_started = time.monotonic()
    outcome.server = server.label
    verdict: bool | None = None  # breaker: True success, False failure, None no verdict
    upstream: UpstreamConnection | None = None
    entry: dict[str, Any] | None = None  # this attempt in the access log, once a head came
    try:
        fresh_retry_left = ask.replayable
        while True:
            upstream = server.pool.take_idle()
            reused = upstream is not None
            if upstream is None:
                upstream = await server.pool.connect()
            if conn.closed:
                upstream.close()
                outcome.status = 499
                return None
            upstream.begin(request.method == b"HEAD")
            conn.on_lost = upstream.abort
            _send_request(upstream, request, head_bytes, conn)
            try:
                response = await upstream.head
                break
            except UpstreamError as error:
                if reused and fresh_retry_left and error.kind == "error" and not conn.closed:
                    fresh_retry_left = False  # the idle-close race: once, on a new connection
                    continue
                raise
        head_seconds = time.monotonic() - attempt_started
        server.observe_latency(head_seconds)
        status = response.status
        word = f"http_{status}"
        failed = word in group.failure_on
        verdict = not failed
        metrics.response(status, head_seconds)
        if failed:
            server.failures += 1
        entry = {"server": server.label, "outcome": status, "ms": round(head_seconds * 1000, 2)}
        outcome.attempts.append(entry)
        if (
            word in group.retry_policy.on
            and not response.upgrade
            and ask.refusal(word, outcome.tries, response_started=False) is None
        ):
            # Hold a small failed response: if no other server does better, it is the answer.
            payload = await _collect_small_body(upstream)
            if payload is not None:
                server.pool.release(upstream)
                upstream = None
                return word, None, (response, payload)
            upstream.close()
            upstream = None
            return word, None, None
        if response.upgrade:
            await _tunnel(conn, request, response, upstream, outcome, extra_headers)
            upstream = None
            return None
        await _relay(conn, request, response, upstream, outcome, extra_headers)
        server.pool.release(upstream)
        upstream = None
        return None
    except UpstreamError as error:
        seconds = time.monotonic() - attempt_started
        if entry is None:
            outcome.attempts.append(
                {"server": server.label, "outcome": error.kind, "ms": round(seconds * 1000, 2)}
            )
        else:  # failed mid-body: still one attempt (and one upstream request), now failed
            entry.update(status=entry["outcome"], outcome=error.kind, ms=round(seconds * 1000, 2))
        if conn.closed:
            outcome.status = 499
            outcome.error = "client went away"
            return None
        if entry is None:
            metrics.response(error.kind, None)
        if error.kind in group.failure_on:
            if verdict is not False:
                server.failures += 1
            verdict = False
        if conn.response_started:
            # Bytes already reached the client: all we can do is cut the connection.
            outcome.error = error.detail
            conn.abort()
            return None
        return error.kind, error, None
    finally:
        conn.on_lost = None
        if upstream is not None:
            upstream.abort()
        server.in_flight -= 1
        metrics.in_flight_dec()
        elapsed = time.monotonic() - attempt_started
        outcome.upstream_seconds += elapsed
        server.stats.record(elapsed, verdict is False)
        if verdict is True:
            server.breaker.record_success()
        elif verdict is False:
            server.breaker.record_failure()
        else:
            server.breaker.release()


async def _collect_small_body(upstream: UpstreamConnection) -> bytes | None:
    """Read a failed response's body if it is small, so it can still be the final answer."""
    collector = _Collector()
    upstream.attach(collector)
    if not collector.too_big:
        try:
            await upstream.wait_done()
        except UpstreamError:
            return None
    if collector.too_big or not upstream.complete:
        return None
    return b"".join(collector.chunks)


class _Collector:
    __slots__ = ("chunks", "size", "too_big")

    def __init__(self) -> None:
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
        pass

    def on_abort(self, error: Exception) -> None:
        pass


def _request_head(conn: ClientConnection, request: Request, route: Any) -> bytes:
    target = request.target
    prefix = route.strip_prefix
    if prefix and target.startswith(prefix):
        target = target[len(prefix) :]
        if not target.startswith(b"/"):
            target = b"/" + target
    parts = [request.method, b" ", target, b" HTTP/1.1\r\n"]
    dropped = request.connection_tokens
    for (name, value), lowered in zip(request.headers, request.lowered, strict=True):
        if lowered in REQUEST_REWRITTEN or lowered in dropped:
            continue
        parts += (name, b": ", value, b"\r\n")
    forwarded_for = request.forwarded_for
    peer = conn.peer.encode()
    parts += (
        b"X-Forwarded-For: ",
        forwarded_for + b", " + peer if forwarded_for else peer,
        b"\r\nX-Forwarded-Proto: ",
        conn.scheme,
        b"\r\n",
    )
    if request.host is not None:
        parts += (b"X-Forwarded-Host: ", request.host, b"\r\n")
    if request.header(b"x-request-id") is None:
        parts += (b"X-Request-ID: ", request.request_id, b"\r\n")  # type: ignore[arg-type]
    if request.upgrade:
        upgrade = request.header(b"upgrade") or b"websocket"
        parts += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    body = request.body
    if body is not None:
        if body.complete:
            parts.append(b"Content-Length: %d\r\n" % body.received)
        elif request.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % request.content_length)
        else:
            parts.append(b"Transfer-Encoding: chunked\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _send_request(
    upstream: UpstreamConnection, request: Request, head_bytes: bytes, conn: ClientConnection
) -> None:
    body = request.body
    if body is None:
        upstream.write(head_bytes)
        upstream.request_complete = True
        return
    if body.complete:
        upstream.write(head_bytes + b"".join(body.chunks))
        upstream.request_complete = True
        return
    upstream.write(head_bytes)
    writer = _BodyWriter(upstream, chunked=request.content_length is None)
    # Backpressure: an upstream that cannot take the body fast enough stops us reading it.
    upstream.body_writer_paused = partial(conn.set_reading_paused, "upstream")
    body.stream_to(writer)


class _BodyWriter:
    """Client body chunks to the upstream as they arrive, re-framed, with backpressure."""

    __slots__ = ("chunked", "upstream")

    def __init__(self, upstream: UpstreamConnection, *, chunked: bool) -> None:
        self.upstream = upstream
        self.chunked = chunked

    def on_body(self, chunk: bytes) -> None:
        if self.upstream.closed:
            return
        if self.chunked:
            self.upstream.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self.upstream.write(chunk)

    def on_end(self) -> None:
        if self.chunked and not self.upstream.closed:
            self.upstream.write(CHUNK_END)
        self.upstream.request_complete = True


class _ResponseRelay:
    """Upstream body chunks to the client, re-framed, with backpressure the other way.

    The response head waits for the first body bytes so that a small response leaves in
    one system call; ``flush_head`` sends it alone when the body is not there yet.
    """

    __slots__ = ("bytes_out", "chunked", "conn", "head", "upstream")

    def __init__(
        self, conn: ClientConnection, upstream: UpstreamConnection, chunked: bool, head: bytes
    ) -> None:
        self.conn = conn
        self.upstream = upstream
        self.chunked = chunked
        self.head: bytes | None = head
        self.bytes_out = 0

    def on_body(self, chunk: bytes) -> None:
        self.bytes_out += len(chunk)
        data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked else chunk
        head = self.head
        if head is None:
            self.conn.write(data)
        else:
            self.head = None
            self.conn.write_after(head, data)

    def on_end(self) -> None:
        head, self.head = self.head, None
        tail = CHUNK_END if self.chunked else b""
        if head is not None:
            self.conn.write(head + tail)
        elif tail:
            self.conn.write(tail)

    def flush_head(self) -> None:
        head, self.head = self.head, None
        if head is not None:
            self.conn.write(head)

    def on_abort(self, error: Exception) -> None:
        pass  # the failure reaches the pipeline through wait_done()


async def _relay(
    conn: ClientConnection,
    request: Request,
    response: Any,
    upstream: UpstreamConnection,
    outcome: Outcome,
    extra_headers: bytes,
) -> None:
    close = not request.keep_alive or conn.listener.shutting_down
    chunked_out = False
    if response.has_body and response.content_length is None:
        if request.version == "1.1":
            chunked_out = True
        else:
            close = True  # an HTTP/1.0 client reads to the end of the connection
    head = _response_head(
        response, request, _with_trace(outcome, extra_headers), close=close, chunked=chunked_out
    )
    relay = _ResponseRelay(conn, upstream, chunked_out, head)
    conn.response_started = True
    outcome.status = response.status
    # Backpressure: a client that cannot keep up stops us reading the upstream.
    conn.on_write_paused = partial(upstream.set_reading_paused, "client")
    try:
        upstream.attach(relay)
        relay.flush_head()
        await upstream.wait_done()
    finally:
        conn.on_write_paused = None
        outcome.bytes_out += relay.bytes_out
    if close:
        request.keep_alive = False


def _response_head(
    response: Any, request: Request, extra_headers: bytes, *, close: bool, chunked: bool
) -> bytes:
    status = response.status
    reason = response.reason or REASONS.get(status, b"")
    parts = [b"HTTP/1.1 %d %b\r\n" % (status, reason)]
    dropped: tuple[bytes, ...] = ()
    has_request_id = False
    lowered_names = response.lowered
    if b"connection" in lowered_names:
        for (_, value), lowered in zip(response.headers, lowered_names, strict=True):
            if lowered == b"connection":
                dropped += tuple(t.strip().lower() for t in value.split(b","))
    for (name, value), lowered in zip(response.headers, lowered_names, strict=True):
        if lowered in RESPONSE_REWRITTEN or lowered in dropped:
            if lowered == b"content-length" and not response.has_body:
                parts += (name, b": ", value, b"\r\n")  # HEAD/304 announce the entity's size
            continue
        if lowered == b"x-request-id":
            has_request_id = True
        parts += (name, b": ", value, b"\r\n")
    if response.upgrade:
        upgrade = _header(response.headers, b"upgrade") or b"websocket"
        parts += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    elif response.has_body:
        if response.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % response.content_length)
        elif chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
    if not has_request_id:
        parts += (b"X-Request-ID: ", request.request_id, b"\r\n")  # type: ignore[arg-type]
    if extra_headers:
        parts.append(extra_headers)
    if close:
        parts.append(b"Connection: close\r\n")
    elif request.version == "1.0":
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _with_trace(outcome: Outcome, extra_headers: bytes) -> bytes:
    """The decision trace rides on the response head: one compact JSON header."""
    trace = outcome.trace
    if trace is None:
        return extra_headers
    trace["attempts"] = outcome.attempts
    encoded = json.dumps(trace, separators=(",", ":")).encode()  # ASCII: no CR/LF survives
    return extra_headers + b"X-Sluicegate-Trace: " + encoded + b"\r\n"


def _header(headers: list[tuple[bytes, bytes]], lowered_name: bytes) -> bytes | None:
    for name, value in headers:
        if name.lower() == lowered_name:
            return value
    return None


def _send_buffered(
    conn: ClientConnection,
    request: Request,
    response: Any,
    payload: bytes,
    outcome: Outcome,
    extra_headers: bytes,
) -> None:
    close = not request.keep_alive
    response.content_length = len(payload) if response.has_body else response.content_length
    head = _response_head(
        response, request, _with_trace(outcome, extra_headers), close=close, chunked=False
    )
    conn.response_started = True
    conn.write(head + payload if response.has_body else head)
    outcome.status = response.status
    outcome.bytes_out += len(payload)


def _send_error(
    conn: ClientConnection,
    request: Request,
    status: int,
    reason: str,
    outcome: Outcome,
    extra_headers: bytes = b"",
) -> None:
    outcome.status = status
    if not outcome.error and status >= 500:
        outcome.error = reason
    close = not request.keep_alive or (request.body is not None and not request.body.complete)
    conn.response_started = True
    data = error_response(
        status,
        reason,
        request.request_id or b"-",
        close=close,
        extra_headers=_with_trace(outcome, extra_headers),
    )
    conn.write(data)
    outcome.bytes_out += len(data)


class _Tunnel:
    """A switched (101) connection: raw bytes both ways until either side closes."""

    def __init__(self, conn: ClientConnection, upstream: UpstreamConnection) -> None:
        self.conn = conn
        self.upstream = upstream
        self.closed = conn.loop.create_future()

    def from_client(self, data: bytes) -> None:
        if not self.upstream.closed:
            self.upstream.tunnel_activity()
            self.upstream.transport.write(data)  # type: ignore[union-attr]

    def on_body(self, data: bytes) -> None:
        self.conn.write(data)

    def on_end(self) -> None:
        self._done()

    def on_abort(self, error: Exception) -> None:
        self._done()

    def client_closed(self) -> None:
        self.upstream.close()
        self._done()

    def _done(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def _tunnel(
    conn: ClientConnection,
    request: Request,
    response: Any,
    upstream: UpstreamConnection,
    outcome: Outcome,
    extra_headers: bytes,
) -> None:
    head = _response_head(
        response, request, _with_trace(outcome, extra_headers), close=False, chunked=False
    )
    conn.response_started = True
    outcome.status = 101
    conn.write(head)
    tunnel = _Tunnel(conn, upstream)
    conn.tunnel = tunnel
    # Backpressure both ways: whichever side cannot keep up stops us reading the other.
    conn.on_write_paused = partial(upstream.set_reading_paused, "client")
    upstream.body_writer_paused = partial(conn.set_reading_paused, "upstream")
    early = conn.take_early_tunnel_bytes()
    if early:
        tunnel.from_client(early)
    upstream.start_tunnel(tunnel)
    conn.resume_reading("upgrade")
    try:
        await tunnel.closed
    finally:
        conn.on_write_paused = None
        upstream.close()
        conn.close()
        request.keep_alive = False
