"""The request pipeline: route -> rate limit -> select -> breaker -> attempt -> retry -> relay.

``handle(conn, request)`` starts each request. It reads the config generation (``Runtime``)
once, so a reload never changes a request half-way. Every decision that can be made from
the config was made when the ``Runtime`` was built (routes, header sets, metric children);
here we only look things up.

Two ways through, one state. The common request (no trace, no body a retry would need held
in full, and a pooled connection to the chosen server) is served by callbacks: its
``Exchange`` waits for the rate limiter's decision (a Redis batch answers a tick later), is
the waiter of its upstream exchange, and sends a response that came whole with its head in
one write. Everything
else, or anything unusual on the way (no idle connection, a failed try, a listed failure
status to hold, a tunnel), runs as a coroutine that takes over the same ``Exchange`` and
the ``Attempt`` already begun. An ``Attempt`` keeps the books of one try (counters,
metrics, the breaker's verdict) for both ways, and settles them exactly once.

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

from proxy.balancing.retry import FailureKind, status_word
from proxy.dataplane.client import HOP_BY_HOP, REASONS, ClientConnection, Request, error_response
from proxy.dataplane.flow import PauseReason
from proxy.dataplane.upstream import HeadFuture, UpstreamConnection, UpstreamError
from proxy.observability.metrics import in_flight_requests
from proxy.pipeline.compress import begin_compression
from proxy.pipeline.routing import cookie_value
from proxy.ratelimit.bucket import Decision

# Request headers we rewrite ourselves (framing, forwarding facts, 100-continue). The
# client's copies are dropped and ours added after the hop-by-hop ones are gone, so a
# `Connection` that names one of them changes nothing (SPEC: Forwarding).
REQUEST_REWRITTEN = HOP_BY_HOP | {
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",  # always exactly one, the one the response carries
    b"x-sluicegate-trace",  # carries the admin token: never leaves the proxy
}
# Passed on even when `Connection` names it: an HTTP/1.1 request must have its Host.
NEVER_HOP_BY_HOP = b"host"
RESPONSE_REWRITTEN = HOP_BY_HOP | {b"content-length"}
LAST_RESPONSE_LIMIT = 64 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNK_END = b"0\r\n\r\n"


class Exchange:
    """One request on its way through the pipeline: what was decided and what happened.

    Feeds the access log, metrics and the decision trace. The fast path also keeps here
    what it needs between callbacks, and is itself the waiter of its upstream exchange
    (``head_received`` / ``head_failed``) and the listener of its response relay.
    """

    __slots__ = (
        "attempt",
        "attempts",
        "body_chunked",
        "books_closed",
        "budget",
        "bytes_out",
        "cache_status",
        "conn",
        "error",
        "extra_headers",
        "group",
        "head_bytes",
        "key",
        "limit_key",
        "pinned",
        "prepared",
        "rate_limited",
        "replayable",
        "request",
        "response_filter",
        "retry_started",
        "route",
        "route_runtime",
        "runtime",
        "server",
        "started",
        "status",
        "sticky_cookie",
        "sticky_presented",
        "trace",
        "tries",
        "upstream",
        "upstream_seconds",
    )

    def __init__(self, conn: ClientConnection, request: Request, runtime: Any) -> None:
        self.conn = conn
        self.request = request
        self.runtime = runtime
        self.started = time.monotonic()
        self.status = 0
        self.route = ""
        self.route_runtime: Any = None
        self.group: Any = None
        self.upstream = ""
        self.server = ""
        self.tries = 0
        self.error = ""
        self.rate_limited = False
        self.bytes_out = 0
        self.upstream_seconds = 0.0
        self.attempts: list[dict[str, Any]] = []
        self.trace: dict[str, Any] | None = None  # the decision trace, when asked for
        self.extra_headers = b""  # RateLimit-* headers for the answer
        self.budget: Any = None
        self.prepared = False
        self.replayable = request.body is None  # a body becomes replayable once held in full
        self.retry_started = self.started  # the retry time budget counts from here
        self.key: str | None = None
        self.limit_key = ""  # the rate-limit bucket's client key
        self.head_bytes = b""
        self.body_chunked = False
        self.attempt: Attempt | None = None  # the fast path's try in progress
        self.books_closed = False
        in_flight_requests.value += 1  # until close_books
        self.pinned: Any = None  # the server the sticky cookie names
        self.sticky_presented: bytes | None = None  # the sticky cookie's value, if any
        self.sticky_cookie = b""  # Set-Cookie for the answer, when the pin changes
        # A cached route's filter (proxy.cache.serve): relays the response head it is
        # given, or answers from the store when the upstream fails. None elsewhere.
        self.response_filter: Any = None
        self.cache_status = ""  # what the cache did, for the access log

    # -- shared by both paths ------------------------------------------------------------

    def join_group(self, group: Any) -> None:
        self.group = group
        self.upstream = group.name
        self.budget = group.retry_budget
        self.budget.request_started()

    def prepare(self) -> None:
        """What every try sends and how servers are picked: the same for each try."""
        request = self.request
        self.prepared = True
        if self.group.hash_key is not None:
            self.key = _hash_key(self.group, request, self.runtime)
        sticky = self.group.sticky
        if sticky is not None:
            presented = cookie_value(request.header(b"cookie"), sticky.cookie)
            self.sticky_presented = presented
            self.pinned = sticky.server_for(presented)
        body = request.body
        # Chunked to the upstream when the length is not known yet; decided once, with the
        # head, for every try (a body that completes meanwhile is still sent chunked).
        self.body_chunked = (
            body is not None and not body.complete and request.content_length is None
        )
        self.head_bytes = _request_head(
            self.conn, request, self.route_runtime, chunked=self.body_chunked
        )

    def retry_refusal(self, word: str, response_started: bool) -> Any:
        """May this request go to another server after ``word``? None when it may, else
        why not (a ``NoRetry``). Asked after a failed try and before holding a failed
        response; most requests never ask."""
        method, has_idempotency_key = self.method_facts()
        return self.group.retry_policy.should_retry(
            word,
            attempts_done=self.tries,
            started_at=self.retry_started,
            method=method,
            has_idempotency_key=has_idempotency_key,
            body_replayable=self.replayable,
            response_started=response_started,
        )

    def budget_left(self) -> float:
        """Seconds left of ``retry.timeout``, which bounds the whole exchange from the moment
        the request is complete (Envoy's route timeout): inf while a streamed body is still
        arriving (its pace is ``client_body_timeout``'s business; see ``_BodyWriter``)."""
        body = self.request.body
        if body is not None and not body.complete:
            return math.inf
        return self.group.retry_policy.remaining(self.retry_started)

    def method_facts(self) -> tuple[str, bool]:
        """What decides whether the request may be repeated: its method, and whether it
        carries an Idempotency-Key."""
        request = self.request
        return request.method.decode("latin-1"), b"idempotency-key" in request.lowered

    def close_books(self) -> None:
        """The request is over: budget, metrics and the access log line. Once only: a
        crash after the books closed (in ``request_done``) must not count it twice."""
        if self.books_closed:
            return
        self.books_closed = True
        in_flight_requests.value -= 1
        if self.budget is not None:
            self.budget.request_finished()
            self.budget = None
        duration = time.monotonic() - self.started
        route = self.route_runtime
        if route is not None:
            route.metrics.observe(self.request.method, self.status, duration)
            route.counters.requests += 1
        runtime = self.runtime
        if runtime.access_log is not None:
            runtime.log_access(self.conn, self.request, self, duration)

    # -- the fast path: callbacks, no task ------------------------------------------------

    def serve_fast(self) -> Any:
        """The common case by callbacks: the first try, on a pooled connection, of a request
        past its limit with no body to hold and no trace. None when underway (the
        connection hears ``request_done``), else the coroutine that takes over (no idle
        connection, no eligible server)."""
        self.prepare()
        group = self.group
        server = group.select(self.key, (), self.pinned)
        if server is None or not server.breaker.acquire():
            return _serve_slowly(self, tried={server} if server is not None else set())
        attempt = Attempt(self, server)
        upstream = server.pool.take_idle()
        if upstream is None:
            return _serve_slowly(self, tried={server}, attempt=attempt)
        attempt.reused = True
        self.attempt = attempt
        attempt.send(upstream, self)
        return None

    def head_received(self, response: Any) -> None:
        attempt = self.attempt
        try:
            if attempt.judge(response) is not None or response.upgrade:
                self._hand_over(response)  # a failed status to hold and retry, or a tunnel
                return
            upstream = attempt.upstream
            if upstream.complete:  # the whole response came with its head: no relay needed
                _send_buffered(self, response, upstream.take_held())
                attempt.release_upstream()
                self._finish_fast()
                return
            _start_relay(self, response, upstream, listener=self)
        except Exception:
            self._crashed()

    def head_failed(self, error: Exception) -> None:
        self._hand_over(error)

    def interim_received(self, response: Any) -> None:
        """A 1xx (103 Early Hints, 102...) before the answer: on to the client as it comes.
        Not the response: the client may still get any final one, from any server."""
        self.conn.write(_interim_head(response))

    def relay_ended(self, relay: _ResponseRelay) -> None:
        try:
            _relay_over(self, relay)
            self.attempt.release_upstream()
            self._finish_fast()
        except Exception:
            self._crashed()

    def relay_failed(self, relay: _ResponseRelay, error: UpstreamError) -> None:
        try:
            _relay_over(self, relay)
            self.attempt.failed(error)  # the head is out: the client connection is cut
            self._finish_fast()
        except Exception:
            self._crashed()

    def _hand_over(self, got: Any) -> None:
        """Retries, tunnels and the idle-close race are the coroutine's business."""
        attempt, self.attempt = self.attempt, None
        work = _serve_slowly(self, tried={attempt.server}, attempt=attempt, got=got)
        self.conn.serve_async(self.request, work)

    def proceed(self) -> Any:
        """Past routing and limits: the fast path when it can serve, else the coroutine.
        A body the fast path streams as it comes; one a retry may have to replay is held
        in full first, by the coroutine."""
        self.join_group(self.route_runtime.group)
        request = self.request
        cache = self.route_runtime.cache
        if cache is not None:
            return cache.serve(self)  # None for a hit answered at once, else a coroutine
        if self.trace is None:
            if request.body is None:
                return self.serve_fast()
            if not self.holds_body():
                if request.expect_continue:
                    self.conn.write(CONTINUE)
                return self.serve_fast()
        return _serve_slowly(self)

    def holds_body(self) -> bool:
        """Is the body held in full before the first try, so that a retry can replay it?"""
        request = self.request
        retry = self.group.retry_policy
        if retry.tries <= 1:
            return False
        if request.content_length is not None and request.content_length > retry.max_body_bytes:
            return False
        method, has_idempotency_key = self.method_facts()
        return retry.may_retry_method(method, has_idempotency_key)

    def limited(self, decision: Decision) -> Any:
        """Go on with the rate limit's decision (``proceed``), or answer it."""
        if _passes_limit(self, decision):
            return self.proceed()
        self.answered()
        return None

    def limit_decided(self, pending: Any) -> None:
        """The Redis check (``begin_check``) is done: go on from the callback."""
        try:
            route = self.route_runtime
            decision = self.runtime.limiter.decided(
                pending, route.name, self.limit_key, route.rate_limit
            )
            if self.conn.closed:
                self.client_gone()
                self.answered()
                return
            work = self.limited(decision)
            if work is not None:
                self.conn.serve_async(self.request, work)
        except Exception:
            self._crashed()

    def client_gone(self) -> None:
        """The client connection ended before the answer: the client left (logged 499, as
        nginx does), or the connection answered it itself (408 stalled body, 413)."""
        rejected = self.conn.rejected_with
        if rejected is None:
            self.status, self.error = 499, "client went away"
        else:
            self.status, self.error, sent = rejected
            self.bytes_out += sent

    def answered(self) -> None:
        """Answered without an upstream (404, 429...): the request is over."""
        self.close_books()
        self.conn.request_done(self.request)

    def _finish_fast(self) -> None:
        attempt, self.attempt = self.attempt, None
        attempt.settle()
        self.close_books()
        self.conn.request_done(self.request)

    def _crashed(self) -> None:
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.settle()
        self.conn.on_write_paused = None
        self.conn.request_crashed(self.request)
        self.close_books()


def handle(conn: ClientConnection, request: Request) -> Any:
    """Serve one request. Returns None when callbacks serve it (they tell the connection
    when it is done), else the coroutine that serves it."""
    runtime = conn.listener.runtime
    ex = Exchange(conn, request, runtime)
    if not request.request_id:  # absent, or sent empty: an ID that names nothing
        request.request_id = runtime.new_request_id()
    route = runtime.router.match(request.method, request.host, request.path, request)
    if request.trace is not None and runtime.wants_trace(request):
        ex.trace = {"route": route.name if route is not None else None, "retries": []}
    if route is None:
        _send_error(ex, 404, "no route matched")
        ex.answered()
        return None
    ex.route = route.name
    ex.route_runtime = route
    rule = route.rate_limit
    if rule is None:
        return ex.proceed()
    ex.limit_key = _limit_key(route, request, runtime)
    pending = runtime.limiter.begin_check(route.name, ex.limit_key, rule)
    if isinstance(pending, Decision):
        return ex.limited(pending)
    pending.add_done_callback(ex.limit_decided)  # Redis answers the batch a tick later
    return None


async def _serve_slowly(
    ex: Exchange, tried: set[Any] | None = None, attempt: Attempt | None = None, got: Any = None
) -> None:
    """The coroutine path: from the start, or taking over from the fast path (``tried``,
    and the try it had begun with what came of it)."""
    try:
        await _forward(ex, set() if tried is None else tried, attempt, got)
    finally:
        ex.close_books()


def _passes_limit(ex: Exchange, decision: Decision) -> bool:
    """Apply a rate-limit decision: True to go on, False when the client has been answered
    (429 over the limit, 503 when Redis is down and the rule says deny)."""
    rule = ex.route_runtime.rate_limit
    if ex.trace is not None:
        ex.trace["rate_limit"] = {
            "allowed": decision.allowed,
            "remaining": decision.remaining,
            "limit": decision.limit,
            "mode": rule.mode,
            "backend_failed": decision.backend_failed,
        }
    if decision.backend_failed:
        # Redis failed and `allow`/`deny` decided without a bucket: no counts to tell, and
        # a `deny` is the limiter being down (503), not the client over its limit.
        if not decision.allowed and rule.mode == "enforce":
            _send_error(ex, 503, "rate limiter unavailable", _cache_bypassed(ex))
            return False
        return True
    ex.extra_headers = _rate_limit_headers(decision)
    if not decision.allowed:
        ex.rate_limited = True
        ex.route_runtime.metrics.rate_limited()
        ex.route_runtime.counters.rate_limited += 1
        if rule.mode == "enforce":
            retry_after = b"Retry-After: %d\r\n" % max(1, math.ceil(decision.retry_after))
            extra = ex.extra_headers + retry_after + _cache_bypassed(ex)
            _send_error(ex, 429, "rate limited", extra)
            return False
    return True


def _cache_bypassed(ex: Exchange) -> bytes:
    """On a cached route, an answer the cache never saw still carries Cache-Status."""
    cache = ex.route_runtime.cache
    return cache.bypassed(ex) if cache is not None else b""


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
    ex: Exchange, tried: set[Any], attempt: Attempt | None = None, got: Any = None
) -> None:
    """Tries until one answers or no retry is allowed. Taking over from the fast path,
    ``attempt`` is its begun try (``got``: the head or failure it came to, if any)."""
    conn = ex.conn
    group = ex.group
    if not ex.prepared:
        replayable = await _take_body(ex)
        if replayable is None:
            return
        ex.prepare()
        ex.replayable = replayable
        ex.retry_started = time.monotonic()  # the retry time budget starts once the body is held
        if ex.trace is not None:
            ex.trace["policy"] = group.config.policy
            ex.trace["candidates"] = [
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
    last_error: UpstreamError | None = None
    last_response: tuple[Any, bytes] | None = None
    holding_retry = False
    try:
        while True:
            if attempt is None:
                server = group.select(ex.key, tried, ex.pinned)
                if server is None:
                    break
                tried.add(server)
                if not server.breaker.acquire():
                    continue
                attempt = Attempt(ex, server)
            result = await _attempt(ex, attempt, got)
            attempt = got = None
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
                    _ERROR, f"upstream answered {failure_word} (body too large to hold)", sent=True
                )
            if error is not None and error.budget_spent:
                last_response = None  # the budget is spent: the answer is 504 (SPEC)
                break
            if ex.retry_refusal(failure_word, conn.response_started) is not None:
                break
            if not group.retry_budget.try_acquire_retry():
                break
            holding_retry = True
            ex.runtime.metrics.retry(group.name, failure_word)
            if ex.trace is not None:
                ex.trace["retries"].append(failure_word)
    finally:
        if holding_retry:
            group.retry_budget.release_retry()
        if attempt is not None:  # taken over but never run (an exception on the way)
            attempt.settle()

    if conn.closed:
        if not ex.status:  # gone before anything could answer it
            ex.client_gone()
        return
    if conn.response_started:
        return
    if ex.response_filter is not None and ex.response_filter.upstream_failed(ex, last_response):
        return  # answered from the cache (stale-if-error)
    if last_response is not None:
        head, payload = last_response
        _send_buffered(ex, head, payload)
    elif last_error is not None:
        status = 504 if last_error.kind is _TIMEOUT else 502
        ex.error = last_error.detail
        _send_error(ex, status, last_error.detail, ex.extra_headers)
    else:
        _send_error(ex, 503, "no eligible server", ex.extra_headers)


async def _take_body(ex: Exchange) -> bool | None:
    """100-continue, and the body held in full when a retry may need to replay it.
    Whether the body can be replayed; None when the client went away meanwhile."""
    request = ex.request
    body = request.body
    if body is None:
        return True
    if request.expect_continue:
        ex.conn.write(CONTINUE)
    if ex.holds_body():
        try:
            return await body.buffer_up_to(ex.group.retry_policy.max_body_bytes)
        except (ConnectionError, OSError):
            ex.client_gone()
            return None
    return False


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


class Attempt:
    """One try on one server, and what it owes when it ends: counters, metrics, and the
    breaker's verdict. Both paths drive it: ``send``, then ``judge`` the head or ``failed``,
    and ``settle`` exactly once."""

    __slots__ = (
        "entry",
        "ex",
        "metrics",
        "retry_word",
        "reused",
        "server",
        "settled",
        "started",
        "upstream",
        "verdict",
    )

    def __init__(self, ex: Exchange, server: Any) -> None:
        server.in_flight += 1
        server.requests += 1
        self.metrics = metrics = server.metrics
        metrics.in_flight_inc()
        ex.tries += 1
        ex.server = server.label
        self.ex = ex
        self.server = server
        self.started = time.monotonic()
        self.verdict: bool | None = None  # breaker: True success, False failure, None none
        self.upstream: UpstreamConnection | None = None
        self.entry: dict[str, Any] | None = None  # this try in the access log, once a head came
        self.reused = False
        self.settled = False
        self.retry_word: str | None = None  # set by judge()

    def send(self, upstream: UpstreamConnection, waiter: Any) -> None:
        ex = self.ex
        request = ex.request
        conn = ex.conn
        self.upstream = upstream
        upstream.begin(request.method == b"HEAD", waiter, conn.loop.time() + ex.budget_left())
        if request.version == "1.1":  # no 1xx to an HTTP/1.0 client (RFC 9110 15.2)
            upstream.interim_listener = ex
        conn.on_lost = upstream.abort
        _send_request(
            upstream,
            request,
            ex.head_bytes,
            conn,
            chunked=ex.body_chunked,
            budget=ex.group.retry_policy.timeout,
        )

    def judge(self, response: Any) -> str | None:
        """Book the response head. Its failure word when it is a listed status the request
        may still be retried for (hold its body: another server may do better), else None."""
        ex = self.ex
        server = self.server
        head_seconds = time.monotonic() - self.started
        server.observe_latency(head_seconds)
        status = response.status
        word = _STATUS_WORDS.get(status) or status_word(status)
        group = ex.group
        failed = word in group.failure_on
        self.verdict = not failed
        self.metrics.response(status, head_seconds)
        server.status_classes[status // 100] += 1
        if failed:
            server.failures += 1
        entry = {"server": server.label, "outcome": status, "ms": round(head_seconds * 1000, 2)}
        self.entry = entry
        if group.sticky is not None:  # the server that answers is the one to stick to
            ex.sticky_cookie = group.sticky.set_cookie(server, ex.sticky_presented)
        ex.attempts.append(entry)
        if (
            word in group.retry_policy.on
            and not response.upgrade
            and ex.retry_refusal(word, response_started=False) is None
        ):
            self.retry_word = word
            return word
        return None

    def failed(self, error: UpstreamError) -> tuple[str, UpstreamError, None] | None:
        """Book a failure. None when the client has been dealt with (gone, or cut because
        the response had started), else what ``_forward`` weighs for a retry."""
        ex = self.ex
        conn = ex.conn
        server = self.server
        seconds = time.monotonic() - self.started
        entry = self.entry
        if entry is None:
            ex.attempts.append(
                {"server": server.label, "outcome": error.kind, "ms": round(seconds * 1000, 2)}
            )
        else:  # failed mid-body: still one attempt (and one upstream request), now failed
            entry.update(status=entry["outcome"], outcome=error.kind, ms=round(seconds * 1000, 2))
        if conn.closed:
            ex.client_gone()
            return None
        if entry is None:
            self.metrics.response(error.kind, None)
            server.count_no_answer(error.kind)
        if error.kind in ex.group.failure_on:
            if self.verdict is not False:
                server.failures += 1
            self.verdict = False
        if conn.response_started:
            # Bytes already reached the client: all we can do is cut the connection.
            ex.error = error.detail
            conn.abort()
            return None
        return error.kind, error, None

    def release_upstream(self) -> None:
        """The exchange ended well: the connection may serve another."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            self.server.pool.release(upstream)

    def settle(self) -> None:
        if self.settled:
            return
        self.settled = True
        ex = self.ex
        ex.conn.on_lost = None
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()
        server = self.server
        server.in_flight -= 1
        self.metrics.in_flight_dec()
        elapsed = time.monotonic() - self.started
        ex.upstream_seconds += elapsed
        server.stats.record(elapsed, self.verdict is False)
        verdict = self.verdict
        if verdict is True:
            server.breaker.record_success()
        elif verdict is False:
            server.breaker.record_failure()
        else:
            server.breaker.release()


_STATUS_WORDS = {status: status_word(status) for status in range(100, 600)}
_ERROR = FailureKind.ERROR
_TIMEOUT = FailureKind.TIMEOUT
_UPSTREAM_PAUSE = PauseReason.UPSTREAM
_CLIENT_PAUSE = PauseReason.CLIENT
_UPGRADE_PAUSE = PauseReason.UPGRADE


async def _attempt(
    ex: Exchange, attempt: Attempt, got: Any = None
) -> tuple[str, UpstreamError | None, Any] | None:
    """Run one try to its end. None when the client has been answered (or is gone);
    otherwise (failure word, error or None, (head, body) of a failed response or None).
    ``got``: the head (or failure) the fast path already came to."""
    try:
        if got is None or isinstance(got, UpstreamError):
            response = await _await_head(ex, attempt, got)
            if response is None:
                return None  # the client went away while we connected
            word = attempt.judge(response)
        else:  # the fast path judged it already
            response = got
            word = attempt.retry_word
        upstream = attempt.upstream
        assert upstream is not None
        if word is not None:
            # Hold a small failed response: if no other server does better, it is the answer.
            payload = await _collect_small_body(upstream)
            if payload is not None:
                attempt.release_upstream()
                return word, None, (response, payload)
            return word, None, None
        if response.upgrade:
            attempt.upstream = None
            await _tunnel(ex, response, upstream)
            return None
        response_filter = ex.response_filter
        if response_filter is None:
            await _relay(ex, response, upstream)
        elif not await response_filter.relay(ex, response, upstream):
            return None  # the filter answered and left the upstream unread: not reusable
        attempt.release_upstream()
        return None
    except UpstreamError as error:
        return attempt.failed(error)
    finally:
        attempt.settle()


async def _await_head(ex: Exchange, attempt: Attempt, failure: UpstreamError | None) -> Any:
    """Send the request and wait for the response head; None if the client went away.

    A pooled connection the upstream closed while idle is a known race: a failure before
    any response byte is retried once on a fresh connection, when the request can be
    replayed. ``failure``: how the fast path's try on a pooled connection ended.
    """
    conn = ex.conn
    pool = attempt.server.pool
    fresh_retry_left = ex.replayable
    if failure is not None:
        attempt.upstream = None  # it failed; the failure closed it
        if not _idle_race(failure, attempt.reused, fresh_retry_left, conn):
            raise failure
        fresh_retry_left = False
    while True:
        upstream = pool.take_idle()
        attempt.reused = upstream is not None
        if upstream is None:
            upstream = await pool.connect(ex.budget_left())
        if conn.closed:
            upstream.close()
            ex.client_gone()
            return None
        waiter = HeadFuture(loop=conn.loop)
        attempt.send(upstream, waiter)
        try:
            return await waiter
        except UpstreamError as error:
            if _idle_race(error, attempt.reused, fresh_retry_left, conn):
                fresh_retry_left = False  # once, on a new connection
                attempt.upstream = None
                continue
            raise


def _idle_race(error: UpstreamError, reused: bool, fresh_retry_left: bool, conn: Any) -> bool:
    return reused and fresh_retry_left and error.kind is _ERROR and not conn.closed


async def _collect_small_body(upstream: UpstreamConnection) -> bytes | None:
    """Read a failed response's body if it is small, so it can still be the final answer."""
    collector = _Collector()
    upstream.attach(collector)
    if not collector.too_big:
        try:
            await upstream.wait_done()
        except UpstreamError as error:
            if error.budget_spent:
                raise  # the exchange is over: 504, not this response
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


def _request_head(conn: ClientConnection, request: Request, route: Any, *, chunked: bool) -> bytes:
    target = request.target
    prefix = route.strip_prefix
    if prefix and target.startswith(prefix):
        target = target[len(prefix) :]
        if not target.startswith(b"/"):
            target = b"/" + target
    parts = [request.method, b" ", target, b" HTTP/1.1\r\n"]
    dropped = request.connection_tokens
    for (name, value), lowered in zip(request.headers, request.lowered, strict=True):
        if lowered in REQUEST_REWRITTEN or (lowered in dropped and lowered != NEVER_HOP_BY_HOP):
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
    # The client's own ID when it sent one (the last, if several), else the one we made.
    parts += (b"X-Request-ID: ", request.request_id, b"\r\n")  # type: ignore[arg-type]
    if request.upgrade:
        upgrade = request.header(b"upgrade") or b"websocket"
        parts += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    body = request.body
    if body is not None:
        if chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif body.complete:
            parts.append(b"Content-Length: %d\r\n" % body.received)
        else:
            parts.append(b"Content-Length: %d\r\n" % request.content_length)
    parts.append(b"\r\n")
    return b"".join(parts)


def _send_request(
    upstream: UpstreamConnection,
    request: Request,
    head_bytes: bytes,
    conn: ClientConnection,
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
    writer = _BodyWriter(upstream, head_bytes, chunked, budget)
    # Backpressure: an upstream that cannot take the body fast enough stops us reading it.
    upstream.body_writer_paused = partial(conn.set_reading_paused, _UPSTREAM_PAUSE)
    body.stream_to(writer)


class _Reframed:
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


class _BodyWriter(_Reframed):
    """The client's body to the upstream, with backpressure (see ``_send_request``).

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


class _ResponseRelay(_Reframed):
    """The upstream's body to the client, with backpressure the other way.

    ``flush_head`` sends the head alone when the body is not there yet.
    """

    __slots__ = ("close", "listener")

    def __init__(
        self, conn: ClientConnection, chunked: bool, head: bytes, close: bool, listener: Any
    ) -> None:
        super().__init__(conn, head, chunked)
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
        # else the failure reaches the coroutine through wait_done()


class _FilteredRelay(_ResponseRelay):
    """The upstream's body coded on the way (``compress``: each chunk flushed as it comes),
    and/or copied as it leaves to ``tap`` (the cache's ``BodyWriter``)."""

    __slots__ = ("encoder", "tap")

    def __init__(
        self,
        conn: ClientConnection,
        chunked: bool,
        head: bytes,
        close: bool,
        listener: Any,
        encoder: Any,
        tap: Any,
    ) -> None:
        super().__init__(conn, chunked, head, close, listener)
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


def _begin_compression(ex: Exchange, response: Any, length: int | None) -> Any:
    """The route's ``compress`` rule applied to a response head: its encoder, or None."""
    route = ex.route_runtime
    encoder, algorithm = begin_compression(route.compress, ex.request, response, length)
    if algorithm is not None:
        route.metrics.compressed(algorithm)
    return encoder


def _start_relay(
    ex: Exchange,
    response: Any,
    upstream: UpstreamConnection,
    listener: Any = None,
    tap: Any = None,
) -> _ResponseRelay:
    """Send the response head (with the first body bytes) and stream the rest as it comes.
    ``listener`` hears the end; without one, await ``upstream.wait_done()``."""
    conn = ex.conn
    request = ex.request
    close = not request.keep_alive or conn.listener.shutting_down
    encoder = None
    if ex.route_runtime.compress is not None and (response.has_body or request.method == b"HEAD"):
        length = None if response.chunked else response.content_length
        encoder = _begin_compression(ex, response, length)
    chunked_out = False
    if response.has_body and response.content_length is None:
        if request.version == "1.1":
            chunked_out = True
        else:
            close = True  # an HTTP/1.0 client reads to the end of the connection
    extra = _with_trace(ex, ex.extra_headers + ex.sticky_cookie)
    head = _response_head(response, request, extra, close=close, chunked=chunked_out)
    if encoder is None and tap is None:
        relay = _ResponseRelay(conn, chunked_out, head, close, listener)
    else:
        relay = _FilteredRelay(conn, chunked_out, head, close, listener, encoder, tap)
    conn.response_started = True
    ex.status = response.status
    # Backpressure: a client that cannot keep up stops us reading the upstream.
    conn.on_write_paused = partial(upstream.set_reading_paused, _CLIENT_PAUSE)
    upstream.attach(relay)  # may end the relay at once: the whole body is often here
    if relay.head is not None:
        relay.flush_head()
    return relay


def _relay_over(ex: Exchange, relay: Any) -> None:
    ex.conn.on_write_paused = None
    ex.bytes_out += relay.bytes_out
    if relay.close:
        ex.request.keep_alive = False


async def _relay(ex: Exchange, response: Any, upstream: UpstreamConnection) -> None:
    relay = _start_relay(ex, response, upstream)
    try:
        await upstream.wait_done()
    finally:
        _relay_over(ex, relay)


def _response_head(
    response: Any, request: Request, extra_headers: bytes, *, close: bool, chunked: bool
) -> bytes:
    status = response.status
    reason = response.reason or REASONS.get(status, b"")
    parts = [b"HTTP/1.1 %d %b\r\n" % (status, reason)]
    has_request_id = False
    lowered_names = response.lowered
    dropped = _named_in_connection(response) if b"connection" in lowered_names else ()
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


def _interim_head(response: Any) -> bytes:
    """A 1xx head as the upstream sent it, less its hop-by-hop fields."""
    status = response.status
    parts = [b"HTTP/1.1 %d %b\r\n" % (status, response.reason or REASONS.get(status, b""))]
    dropped = _named_in_connection(response)
    for (name, value), lowered in zip(response.headers, response.lowered, strict=True):
        if lowered not in RESPONSE_REWRITTEN and lowered not in dropped:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _named_in_connection(response: Any) -> tuple[bytes, ...]:
    """The fields the response's ``Connection`` names: hop-by-hop, never passed on."""
    dropped: tuple[bytes, ...] = ()
    if b"connection" in response.lowered:
        for (_, value), lowered in zip(response.headers, response.lowered, strict=True):
            if lowered == b"connection":
                dropped += tuple(t.strip().lower() for t in value.split(b","))
    return dropped


def _with_trace(ex: Exchange, extra_headers: bytes) -> bytes:
    """The decision trace rides on the response head: one compact JSON header."""
    trace = ex.trace
    if trace is None:
        return extra_headers
    trace["attempts"] = ex.attempts
    encoded = json.dumps(trace, separators=(",", ":")).encode()  # ASCII: no CR/LF survives
    return extra_headers + b"X-Sluicegate-Trace: " + encoded + b"\r\n"


def _header(headers: list[tuple[bytes, bytes]], lowered_name: bytes) -> bytes | None:
    for name, value in headers:
        if name.lower() == lowered_name:
            return value
    return None


def _send_buffered(ex: Exchange, response: Any, payload: bytes) -> None:
    """A complete response held in full: sent with its length, in one system call."""
    conn = ex.conn
    request = ex.request
    close = not request.keep_alive or conn.listener.shutting_down
    route = ex.route_runtime
    if (
        route is not None
        and route.compress is not None
        and (response.has_body or request.method == b"HEAD")
    ):
        length = len(payload) if response.has_body else response.content_length
        encoder = _begin_compression(ex, response, length)
        if encoder is not None:
            payload = encoder.compress(payload) + encoder.finish()
    if response.has_body:
        response.reframe(len(payload))  # also re-frames a chunked one
    extra = ex.extra_headers + ex.sticky_cookie
    if ex.trace is not None:
        extra = _with_trace(ex, extra)
    head = _response_head(response, request, extra, close=close, chunked=False)
    conn.response_started = True
    if response.has_body and payload:
        conn.write_after(head, payload)
    else:
        conn.write(head)
    ex.status = response.status
    ex.bytes_out += len(payload)
    if close:
        request.keep_alive = False


def _send_error(ex: Exchange, status: int, reason: str, extra_headers: bytes = b"") -> None:
    conn = ex.conn
    request = ex.request
    ex.status = status
    if not ex.error and status >= 500:
        ex.error = reason
    close = (
        not request.keep_alive
        or (request.body is not None and not request.body.complete)
        or conn.listener.shutting_down
    )
    conn.response_started = True
    data = error_response(
        status,
        reason,
        request.request_id or b"-",
        close=close,
        extra_headers=_with_trace(ex, extra_headers),
    )
    conn.write(data)
    ex.bytes_out += len(data)
    if close:
        request.keep_alive = False  # said Connection: close: the connection ends after it


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


async def _tunnel(ex: Exchange, response: Any, upstream: UpstreamConnection) -> None:
    conn = ex.conn
    request = ex.request
    head = _response_head(
        response, request, _with_trace(ex, ex.extra_headers), close=False, chunked=False
    )
    conn.response_started = True
    ex.status = 101
    conn.write(head)
    tunnel = _Tunnel(conn, upstream)
    conn.tunnel = tunnel
    # Backpressure both ways: whichever side cannot keep up stops us reading the other.
    conn.on_write_paused = partial(upstream.set_reading_paused, _CLIENT_PAUSE)
    upstream.body_writer_paused = partial(conn.set_reading_paused, _UPSTREAM_PAUSE)
    early = conn.take_early_tunnel_bytes()
    if early:
        tunnel.from_client(early)
    upstream.start_tunnel(tunnel)
    conn.resume_reading(_UPGRADE_PAUSE)
    try:
        await tunnel.closed
    finally:
        conn.on_write_paused = None
        upstream.close()
        conn.close()
        request.keep_alive = False
