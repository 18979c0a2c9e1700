"""The request lifecycle: one ``Exchange`` per request, driven by callbacks end to end.

``handle(conn, request)`` starts each request. It reads the config generation (``Runtime``)
once, so a reload never changes a request half-way. Every decision that can be made from
the config was made when the ``Runtime`` was built (routes, filters, header sets, metric
children); here we only look things up.

The exchange is an explicit state machine (``proxy.pipeline.phases``): each step is a
method that ``_enter``s the next phase, checked against the transition table, and each
wait is a callback into the exchange, never a coroutine: the route's request filters
(``filters``: a filter that waits, as the Redis limiter and the cache do, suspends the
exchange on a future and is asked again when it is done), the body held for replay
(``RequestBody.buffer_then``), a new upstream connection (``ConnectionPool.connect_then``),
the response head (the exchange is its upstream exchange's waiter), a failed response
held while small (``Collector``), the relay's end, the tunnel's end. The exchange talks
to the client through the ``Downstream`` protocol, and reads time from the runtime's
clock.

Retry safety (nginx ``proxy_next_upstream`` semantics): an attempt that failed is tried again
on a server not yet tried while the failure word is listed in ``retry.on``, tries and the
time budget remain, nothing of the response has reached the client, the method may be
repeated, the request body (if any) is held in full so it can be replayed, and the retry
budget allows. A pooled connection the upstream closed while idle is a known race: such a
failure before any response byte is retried once on another connection to the same server,
without spending a try, when the request can be replayed. ``_try_failed`` is where a
failed try ends, and calls ``_select`` again for the next one.
"""

from __future__ import annotations

import math
from typing import Any

try:
    import cython
except ModuleNotFoundError:  # run as Python where Cython is not installed
    from proxy import cythonshim as cython

from proxy.balancing.retry import FailureKind
from proxy.dataplane.client import Request
from proxy.dataplane.flow import PauseReason
from proxy.dataplane.upstream import UpstreamError
from proxy.observability.metrics import in_flight_requests
from proxy.pipeline.answer import send_buffered, send_error, with_trace
from proxy.pipeline.attempt import Attempt
from proxy.pipeline.downstream import Downstream
from proxy.pipeline.framing import CONTINUE, interim_head, request_head, response_head
from proxy.pipeline.phases import TRANSITIONS, IllegalTransition, Phase
from proxy.pipeline.relay import Collector, relay_over, start_relay
from proxy.pipeline.routing import cookie_value
from proxy.pipeline.tunnel import Tunnel
from proxy.pipeline.verdict import Verdict

if cython.compiled:
    from cython.cimports.proxy.pipeline.state import ExchangeState
else:
    from proxy.pipeline.state import ExchangeState

_ROUTED = Phase.ROUTED
_REQUEST_FILTERS = Phase.REQUEST_FILTERS
_BODY = Phase.BODY
_SELECT = Phase.SELECT
_CONNECT = Phase.CONNECT
_AWAIT_HEAD = Phase.AWAIT_HEAD
_HOLD_FAILED = Phase.HOLD_FAILED
_RELAY = Phase.RELAY
_TUNNEL = Phase.TUNNEL
_DONE = Phase.DONE
_CONTINUE = Verdict.CONTINUE
_ANSWERED = Verdict.ANSWERED
_SUSPENDED = Verdict.SUSPENDED
_ERROR = FailureKind.ERROR
_TIMEOUT = FailureKind.TIMEOUT
_UPGRADE_PAUSE = PauseReason.UPGRADE
_NOT_TRIED: tuple[Any, ...] = ()
# No try yet: empty and shared, where a list per request would be made and freed unused
# by every request answered without one (a cache hit, a 429, a 404).
_NO_ATTEMPTS: Any = ()


@cython.cclass
class Exchange(ExchangeState):
    """One request on its way through the pipeline: its phase, what was decided and what
    happened. Feeds the access log, metrics and the decision trace; is the waiter of its
    upstream exchange (``head_received`` / ``head_failed``), the listener of its relay,
    held body, connect, failed-body collector and tunnel.

    Compiled (proxy/compiled.py), an extension type: its own steps read and write its
    fields (``ExchangeState``, state.py) as C fields and call each other as C functions.
    The fields stay public: the filters and answer.py read and write them from Python, at
    about 100 instructions a read more than a ``__slots__`` field, and the compiled attempt,
    the cache's fresh hit and the access line as C fields, through state.pxd (DESIGN.md,
    "The compiled hot path")."""

    def __init__(self, conn: Downstream, request: Request, runtime: Any) -> None:
        self.phase = _ROUTED
        self.conn = conn
        self.request = request
        self.runtime = runtime
        self.clock = clock = runtime.clock
        self.started = clock()
        self.status = 0
        self.route = ""
        self.route_runtime = None
        self.group = None
        self.upstream = ""
        self.server = ""
        self.tries = 0
        self.error = ""
        self.rate_limited = False
        self.bytes_out = 0
        self.upstream_seconds = 0.0
        self.attempts = _NO_ATTEMPTS  # a list from the first try on
        self.trace = None  # the decision trace, when asked for
        self.extra_headers = b""  # RateLimit-* headers for the answer
        self.budget = None
        self.key = None
        self.limit_key = ""  # the rate-limit bucket's client key
        self.attempt = None  # the try in progress
        self.books_closed = False
        in_flight_requests.value += 1  # until close_books
        self.sticky_cookie = b""  # Set-Cookie for the answer, when the pin changes
        # A cached request's response filter (proxy.cache.serve): relays the response head
        # it is given, or answers from the store when the upstream fails. None elsewhere.
        self.response_filter = None
        self.cache_status = ""  # what the cache did, for the access log
        self.tried = _NOT_TRIED  # servers tried (a set from the first retry on)
        self.holding_retry = False  # a retry taken from the retry budget, until its try ends
        # Set where first used, not here, and None (0) until then (a store per request each,
        # and most requests never use them; a cache hit none of the forwarding ones):
        # ``filter_at`` (the request
        # filter running or suspended), ``suspended_on`` (the future it waits on),
        # ``replayable`` and ``retry_started`` (``proceed``), ``head_bytes``,
        # ``body_chunked``, ``pinned`` and ``sticky_presented`` (``prepare``), ``collector``
        # (HOLD_FAILED: the failed body being read), ``tunnel``, ``last_error`` and
        # ``last_response`` (a failed try's, read by ``_answer_with_best``).

    @cython.ccall
    def _enter(self, phase: Phase) -> None:
        """The one way the phase changes: along the table, or ``IllegalTransition``."""
        if phase not in TRANSITIONS[self.phase]:
            raise IllegalTransition(self.phase, phase)
        self.phase = phase

    # -- ROUTED -> REQUEST_FILTERS: the route's filters, in order -------------------------

    @cython.cfunc
    def _run_filters(self) -> None:
        filters = self.route_runtime.request_filters
        while self.filter_at < len(filters):
            verdict = filters[self.filter_at].on_request(self)
            if verdict is _SUSPENDED:
                return
            if verdict is _ANSWERED:
                self.answered()
                return
            self.filter_at += 1
        self.proceed()

    def suspend(self, future: Any) -> None:
        """A filter waits for ``future``: when it is done, the same filter's ``resume``
        says what became of the request."""
        self.suspended_on = future  # held: the loop keeps only weak references to tasks
        future.add_done_callback(self._resumed)

    def _resumed(self, future: Any) -> None:
        self.suspended_on = None
        try:
            verdict = self.route_runtime.request_filters[self.filter_at].resume(self, future)
            if verdict is _ANSWERED:
                self.answered()
                return
            if self.conn.closed:  # gone while the filter waited: nobody to forward for
                self.client_gone()
                self.answered()
                return
            if verdict is _SUSPENDED:
                return
            self.filter_at += 1
            self._run_filters()
        except Exception:
            self._crashed()

    # -- the request goes upstream ----------------------------------------------------------

    def join_group(self) -> None:
        """The request will be forwarded (or answered by the cache in its place): it
        counts toward its upstream group's retry budget from now on."""
        if self.group is not None:
            return
        group = self.group = self.route_runtime.group
        self.upstream = group.name
        self.budget = group.retry_budget
        self.budget.request_started()

    @cython.cfunc
    def proceed(self) -> None:
        """Past the filters: 100-continue, the body held for replay when a retry may need
        it (``BODY``), then the first try."""
        if self.group is None:  # join_group(), inline: every forwarded request passes here
            group = self.group = self.route_runtime.group
            self.upstream = group.name
            self.budget = group.retry_budget
            self.budget.request_started()
        request = self.request
        body = request.body
        self.replayable = body is None  # a body becomes replayable once held in full
        self.retry_started = self.started  # the retry time budget counts from here
        if body is not None:
            if request.expect_continue:
                self.conn.write(CONTINUE)
            if self.holds_body():
                self._enter(_BODY)
                body.buffer_then(self.group.retry_policy.max_body_bytes, self)
                return
        self.prepare()
        self._enter(_SELECT)
        self._select()

    @cython.cfunc
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

    def body_held(self, complete: bool) -> None:
        """``BODY``: held in full (replayable), or larger than a retry may hold."""
        try:
            self.replayable = complete
            self.retry_started = self.clock()  # the retry time budget starts once held
            self.prepare()
            self._enter(_SELECT)
            self._select()
        except Exception:
            self._crashed()

    def body_lost(self, error: Exception) -> None:
        try:
            if not isinstance(error, OSError):  # ConnectionError: the client went away
                raise error
            self.client_gone()
            self._forward_over()
        except Exception:
            self._crashed()

    @cython.cfunc
    def prepare(self) -> None:
        """What every try sends and how servers are picked: the same for each try."""
        request = self.request
        if self.group.hash_key is not None:
            self.key = _hash_key(self.group, request, self.runtime)
        sticky = self.group.sticky
        if sticky is not None:
            presented = cookie_value(request.header(b"cookie"), sticky.cookie)
            self.sticky_presented = presented  # the sticky cookie's value, if any
            self.pinned = sticky.server_for(presented)  # the server it names
        else:
            self.pinned = self.sticky_presented = None
        body = request.body
        # Chunked to the upstream when the length is not known yet; decided once, with the
        # head, for every try (a body that completes meanwhile is still sent chunked).
        self.body_chunked = (
            body is not None and not body.complete and request.content_length is None
        )
        self.head_bytes = request_head(
            self.conn, request, self.route_runtime, chunked=self.body_chunked
        )
        if self.trace is not None:
            group = self.group
            self.trace["policy"] = group.config.policy
            self.trace["candidates"] = [
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

    @cython.cfunc
    def _tried_set(self) -> set[Any]:
        tried = self.tried
        if tried is _NOT_TRIED:
            tried = self.tried = set()
        return tried  # type: ignore[no-any-return]

    # -- SELECT -> AWAIT_HEAD, or CONNECT first ---------------------------------------------

    @cython.cfunc
    def _select(self) -> None:
        """A server for the next try (one its breaker lets through), and a connection: a
        pooled one at once, else a new one (``CONNECT``). None left: the answer is the
        last failure, or 503."""
        group = self.group
        while True:
            server = group.select(self.key, self.tried, self.pinned)
            if server is None:
                self._give_up()
                return
            if server.breaker.acquire():
                break
            self._tried_set().add(server)
        attempt = self.attempt = Attempt(self, server)
        upstream = server.pool.take_idle()
        if upstream is not None:
            attempt.reused = True
            self._enter(_AWAIT_HEAD)
            attempt.send(upstream, self)
            return
        self._enter(_CONNECT)
        server.pool.connect_then(self.budget_left(), self)

    @cython.cfunc
    def _connect_again(self) -> None:
        """``CONNECT`` for the idle-close race: another pooled connection, or a new one."""
        attempt = self.attempt
        pool = attempt.server.pool  # type: ignore[union-attr]
        upstream = pool.take_idle()
        if upstream is not None:
            attempt.reused = True  # type: ignore[union-attr]
            self._enter(_AWAIT_HEAD)
            attempt.send(upstream, self)  # type: ignore[union-attr]
            return
        pool.connect_then(self.budget_left(), self)

    def connected(self, upstream: Any) -> None:
        try:
            if self.phase is not _CONNECT:  # the exchange ended meanwhile (a crash)
                upstream.close()
                return
            if self.conn.closed:
                upstream.close()
                self.client_gone()
                self._forward_over()
                return
            attempt = self.attempt
            attempt.reused = False  # type: ignore[union-attr]
            self._enter(_AWAIT_HEAD)
            attempt.send(upstream, self)  # type: ignore[union-attr]
        except Exception:
            self._crashed()

    def connect_failed(self, error: UpstreamError) -> None:
        try:
            if self.phase is _CONNECT:
                self._try_failed(self.attempt.failed(error))  # type: ignore[union-attr]
        except Exception:
            self._crashed()

    def connect_crashed(self, error: BaseException) -> None:
        try:
            raise error
        except Exception:
            self._crashed()

    # -- AWAIT_HEAD: the upstream exchange's waiter -------------------------------------

    def head_received(self, response: Any) -> None:
        try:
            attempt = self.attempt
            if attempt.judge(response) is not None:  # type: ignore[union-attr]
                self._hold_failed(response)
                return
            if response.upgrade:
                self._open_tunnel(response)
                return
            upstream = attempt.upstream  # type: ignore[union-attr]
            response_filter = self.response_filter
            # The whole response came with its head: one write, nothing to relay, done (a
            # compressed one streams, chunked, as SPEC says, even then).
            if (
                upstream.complete
                and response_filter is None
                and self.route_runtime.compression is None
            ):
                send_buffered(self, response, upstream.take_held())
                # attempt.release_upstream(), inline: a call less on most requests' path.
                attempt.upstream = None  # type: ignore[union-attr]
                attempt.server.pool.release(upstream)  # type: ignore[union-attr]
                self._forward_over()
                return
            self._enter(_RELAY)
            if response_filter is not None:  # the cache's: store it, or answer from the store
                task = self.conn.loop.create_task(response_filter.relay(self, response, upstream))
                self.suspended_on = task
                task.add_done_callback(self._filter_relayed)
                return
            start_relay(self, response, upstream, listener=self)
        except Exception:
            self._crashed()

    def head_failed(self, error: UpstreamError) -> None:
        if self.phase is not _AWAIT_HEAD:
            return  # the exchange moved on (a crash aborted the connection)
        try:
            attempt = self.attempt
            if attempt.idle_race(error):  # type: ignore[union-attr]
                attempt.race_left = False  # type: ignore[union-attr]
                attempt.upstream = None  # type: ignore[union-attr]  # the failure closed it
                self._enter(_CONNECT)
                self._connect_again()
                return
            self._try_failed(attempt.failed(error))  # type: ignore[union-attr]
        except Exception:
            self._crashed()

    def interim_received(self, response: Any) -> None:
        """A 1xx (103 Early Hints, 102...) before the answer: on to the client as it comes.
        Not the response: the client may still get any final one, from any server."""
        self.conn.write(interim_head(response))

    # -- HOLD_FAILED: a listed failure status, held while small -------------------------

    @cython.cfunc
    def _hold_failed(self, response: Any) -> None:
        self._enter(_HOLD_FAILED)
        collector = self.collector = Collector(self, response)
        self.attempt.upstream.attach(collector)  # type: ignore[union-attr]
        if self.collector is collector and collector.too_big:  # not told yet, and too big
            self.collector = None
            self._try_failed((self.attempt.retry_word, None, None))  # type: ignore[union-attr]

    def failed_body_held(self, collector: Collector) -> None:
        try:
            if collector is not self.collector:
                return  # given up on already
            self.collector = None
            attempt = self.attempt
            upstream = attempt.upstream  # type: ignore[union-attr]
            held = None
            if not collector.too_big and upstream.complete:
                held = (collector.response, b"".join(collector.chunks))
                attempt.release_upstream()  # type: ignore[union-attr]
                # Pooled again, it may serve another client while this one waits for its
                # next try: its going away must not abort that.
                self.conn.tie_upstream(None)
            self._try_failed((attempt.retry_word, None, held))  # type: ignore[union-attr]
        except Exception:
            self._crashed()

    def failed_body_lost(self, collector: Collector, error: UpstreamError) -> None:
        try:
            if collector is not self.collector:
                return
            self.collector = None
            attempt = self.attempt
            if error.budget_spent:  # the exchange is over: 504, not this response
                self._try_failed(attempt.failed(error))  # type: ignore[union-attr]
            else:
                self._try_failed((attempt.retry_word, None, None))  # type: ignore[union-attr]
        except Exception:
            self._crashed()

    # -- a try ended without an answer: retry, or answer with what there is ---------------

    @cython.cfunc
    def _try_failed(self, result: tuple[str, UpstreamError | None, Any] | None) -> None:
        """The try is over (settled here). ``result``: None when the client has been dealt
        with (gone, or cut mid-response), else (failure word, error or None, (head, body)
        of a failed response held, or None) to weigh for a retry."""
        attempt, self.attempt = self.attempt, None
        attempt.settle()  # type: ignore[union-attr]
        self._release_retry()
        if result is None:
            self._forward_over()
            return
        word, error, held = result
        # A real upstream answer beats a later failure that has none to give.
        if held is not None:
            self.last_response = held
        elif error is not None:
            self.last_error = error
        else:  # a listed status whose body was too large to hold as the final answer
            self.last_error = UpstreamError(
                _ERROR, f"upstream answered {word} (body too large to hold)", sent=True
            )
        if error is not None and error.budget_spent:
            self.last_response = None  # the budget is spent: the answer is 504 (SPEC)
            self._give_up()
            return
        group = self.group
        if (
            self.retry_refusal(word, self.conn.response_started) is not None
            or not group.retry_budget.try_acquire_retry()
        ):
            self._give_up()
            return
        self.holding_retry = True
        self.runtime.metrics.retry(group.name, word)
        if self.trace is not None:
            self.trace["retries"].append(word)
        self._tried_set().add(attempt.server)  # type: ignore[union-attr]
        self._enter(_SELECT)
        self._select()

    @cython.cfunc
    def _release_retry(self) -> None:
        if self.holding_retry:
            self.holding_retry = False
            self.group.retry_budget.release_retry()

    @cython.cfunc
    def _give_up(self) -> None:
        """No (more) tries: answer with the best there is. While the request body is still
        arriving, on the next loop turn: the rest of the read being parsed may refuse the
        request (a malformed or too large body), and that answer is then the one the
        client gets and the access log shows."""
        body = self.request.body
        if body is not None and not body.complete:
            self.conn.loop.call_soon(self._answer_failure)
        else:
            self._answer_failure()

    def _answer_failure(self) -> None:
        try:
            self._answer_with_best()
        except Exception:
            self._crashed()

    @cython.cfunc
    def _answer_with_best(self) -> None:
        conn = self.conn
        last_response = self.last_response  # None unless a failed try set it
        last_error = self.last_error
        if conn.closed:
            if not self.status:  # gone before anything could answer it
                self.client_gone()
        elif conn.response_started:
            pass
        elif self.response_filter is not None and self.response_filter.upstream_failed(
            self, last_response
        ):
            pass  # answered from the cache (stale-if-error)
        elif last_response is not None:
            head, payload = last_response
            send_buffered(self, head, payload)
        elif last_error is not None:
            status = 504 if last_error.kind is _TIMEOUT else 502
            self.error = last_error.detail
            send_error(self, status, last_error.detail, self.extra_headers)
        else:
            send_error(self, 503, "no eligible server", self.extra_headers)
        self._forward_over()

    @cython.ccall
    def retry_refusal(self, word: Any, response_started: bool) -> Any:
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

    @cython.ccall
    def budget_left(self) -> float:
        """Seconds left of ``retry.timeout``, which bounds the whole exchange from the moment
        the request is complete (Envoy's route timeout): inf while a streamed body is still
        arriving (its pace is ``client_body_timeout``'s business; see ``BodyWriter``)."""
        body = self.request.body
        if body is not None and not body.complete:
            return math.inf
        return self.group.retry_policy.remaining(self.retry_started)

    @cython.cfunc
    def method_facts(self) -> tuple:
        """What decides whether the request may be repeated: its method, and whether it
        carries an Idempotency-Key."""
        request = self.request
        return request.method.decode("latin-1"), b"idempotency-key" in request.lowered

    # -- RELAY: the relay's listener --------------------------------------------------

    def relay_ended(self, relay: Any) -> None:
        if self.phase is not _RELAY:
            return  # the exchange moved on (a crash)
        try:
            relay_over(self, relay)
            self.attempt.release_upstream()  # type: ignore[union-attr]
            self._forward_over()
        except Exception:
            self._crashed()

    def relay_failed(self, relay: Any, error: UpstreamError) -> None:
        if self.phase is not _RELAY:
            return  # the exchange moved on (a crash aborted the connection)
        try:
            relay_over(self, relay)
            self._try_failed(self.attempt.failed(error))  # type: ignore[union-attr]
        except Exception:
            self._crashed()

    def _filter_relayed(self, task: Any) -> None:
        """The response filter's relay is over: True when the upstream ended cleanly and
        may serve another exchange."""
        self.suspended_on = None
        try:
            if task.cancelled():
                raise RuntimeError("the response filter's relay was cancelled")
            error = task.exception()
            if isinstance(error, UpstreamError):
                self._try_failed(self.attempt.failed(error))  # type: ignore[union-attr]
                return
            if error is not None:
                raise error
            if task.result():
                self.attempt.release_upstream()  # type: ignore[union-attr]
            self._forward_over()
        except Exception:
            self._crashed()

    # -- TUNNEL -------------------------------------------------------------------------

    @cython.cfunc
    def _open_tunnel(self, response: Any) -> None:
        self._enter(_TUNNEL)
        conn = self.conn
        attempt = self.attempt
        upstream = attempt.upstream  # type: ignore[union-attr]
        attempt.upstream = None  # type: ignore[union-attr]  # the tunnel closes it
        head = response_head(
            response, self.request, with_trace(self, self.extra_headers), close=False, chunked=False
        )
        conn.begin_response()
        self.status = 101
        conn.write(head)
        tunnel = self.tunnel = Tunnel(conn, upstream, self)
        conn.open_tunnel(tunnel)
        # Backpressure both ways: whichever side cannot keep up stops us reading the other.
        conn.relay_from(upstream)
        upstream.feed_from(conn)
        early = conn.take_early_tunnel_bytes()
        if early:
            tunnel.from_client(early)
        upstream.start_tunnel(tunnel)
        conn.resume_reading(_UPGRADE_PAUSE)

    def tunnel_closed(self) -> None:
        try:
            conn = self.conn
            conn.relay_from(None)
            self.tunnel.upstream.close()  # type: ignore[union-attr]
            conn.close()
            self.request.close_after()
            self._forward_over()
        except Exception:
            self._crashed()

    # -- DONE ---------------------------------------------------------------------------

    @cython.cfunc
    def _forward_over(self) -> None:
        """The upstream side is over, whatever the answer: settle the try, then done."""
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.settle()
        if self.holding_retry:
            self._release_retry()
        self.answered()

    @cython.cfunc
    def answered(self) -> None:
        """The request is over: its filters hear it, the books close, and the connection
        may go on to the next request."""
        self._enter(_DONE)
        response_filter = self.response_filter
        if response_filter is not None:
            response_filter.exchange_over(self)
        self.close_books()
        self.conn.request_done(self.request)

    def client_gone(self) -> None:
        """The client connection ended before the answer: the client left (logged 499, as
        nginx does), or the connection answered it itself (408 stalled body, 413)."""
        rejected = self.conn.rejected_with
        if rejected is None:
            self.status, self.error = 499, "client went away"
        else:
            self.status, self.error, sent = rejected
            self.bytes_out += sent

    @cython.cfunc
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
        duration = self.clock() - self.started
        route = self.route_runtime
        if route is not None:
            route.metrics.observe(self.request.method, self.status, duration)
            route.counters.requests += 1
        runtime = self.runtime
        if runtime.access_log is not None:
            runtime.log_access(self.conn, self.request, self, duration)

    @cython.cfunc
    def _crashed(self) -> None:
        """A bug while serving (called from an ``except`` block): 500 if nothing was sent
        yet, and the connection closes. The try and the filters still settle."""
        if self.phase is not _DONE:
            self._enter(_DONE)
            response_filter = self.response_filter
            if response_filter is not None:
                response_filter.exchange_over(self)
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.settle()
        self._release_retry()
        self.conn.relay_from(None)
        self.conn.request_crashed(self.request)
        self.close_books()


def handle(conn: Downstream, request: Request) -> None:
    """Serve one request, by callbacks: they tell the connection when it is done."""
    runtime = conn.listener.runtime
    ex: Exchange = Exchange(conn, request, runtime)
    try:
        if not request.request_id:  # absent, or sent empty: an ID that names nothing
            request.request_id = runtime.new_request_id()
        route = runtime.router.match(request.method, request.host, request.path, request)
        if request.trace is not None and runtime.wants_trace(request):
            ex.trace = {"route": route.name if route is not None else None, "retries": []}
        if route is None:
            send_error(ex, 404, "no route matched")
            ex.answered()
            return
        ex.route = route.name
        ex.route_runtime = route
        if route.request_filters:
            ex._enter(_REQUEST_FILTERS)
            ex.filter_at = 0
            ex._run_filters()
        else:
            ex.proceed()
    except Exception:
        ex._crashed()


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
