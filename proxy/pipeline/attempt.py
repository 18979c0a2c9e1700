"""One try on one server, and what it owes when it ends: counters, metrics, and the
breaker's verdict. The exchange drives it: ``send``, then ``judge`` the head or ``failed``,
and ``settle`` exactly once (a second call does nothing), whatever happened."""

from __future__ import annotations

from typing import Any

try:
    import cython
except ModuleNotFoundError:  # run as Python where Cython is not installed
    from proxy import cythonshim as cython

from proxy.balancing.retry import FailureKind, status_word
from proxy.pipeline.relay import send_request

if cython.compiled:
    from cython.cimports.proxy.pipeline.state import ExchangeState
else:
    from proxy.pipeline.state import ExchangeState

STATUS_WORDS = {status: status_word(status) for status in range(100, 600)}
_ERROR = FailureKind.ERROR


@cython.cclass
class Attempt:
    # Compiled (proxy/compiled.py), its fields are C fields: only the exchange reads them.
    # The exchange's own are C fields here too (state.pxd).
    entry = cython.declare(object, visibility="public")
    ex = cython.declare(ExchangeState, visibility="public")
    metrics = cython.declare(object)
    race_left = cython.declare(cython.bint, visibility="public")
    retry_word = cython.declare(object, visibility="public")
    reused = cython.declare(cython.bint, visibility="public")
    server = cython.declare(object, visibility="public")
    settled = cython.declare(cython.bint)
    started = cython.declare(cython.double)
    upstream = cython.declare(object, visibility="public")
    verdict = cython.declare(object)

    def __init__(self, ex: ExchangeState, server: Any) -> None:
        server.in_flight += 1
        server.requests += 1
        self.metrics = metrics = server.metrics
        metrics.in_flight_inc()
        ex.tries += 1
        ex.server = server.label
        self.ex = ex
        self.server = server
        self.started = ex.clock()
        self.verdict = None  # breaker: True success, False failure, None none
        self.upstream = None
        self.entry = None  # this try in the access log, once a head came
        # A pooled connection the upstream closed while idle: tried once more on another,
        # when the request can be replayed.
        self.race_left = ex.replayable
        self.settled = False
        # Set where first known, not here: ``reused`` (on a pooled connection, which the
        # idle-close race may hit: set before ``send``) and ``retry_word`` (by ``judge``,
        # when it returns one).

    def send(self, upstream: Any, waiter: Any) -> None:
        ex = self.ex
        request = ex.request
        conn = ex.conn
        self.upstream = upstream
        upstream.begin(
            request.method == b"HEAD",
            waiter,
            conn.loop.time() + ex.budget_left(),
            # No 1xx to an HTTP/1.0 client (RFC 9110 15.2).
            ex if request.version == "1.1" else None,
        )
        conn.tie_upstream(upstream)
        send_request(
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
        head_seconds: cython.double = ex.clock() - self.started
        server.observe_latency(head_seconds)
        status = response.status
        word = STATUS_WORDS.get(status) or status_word(status)
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
        _log_attempt(ex, entry)
        if (
            word in group.retry_policy.on
            and not response.upgrade
            and ex.retry_refusal(word, response_started=False) is None
        ):
            self.retry_word = word
            return word
        return None

    def idle_race(self, error: Any) -> bool:
        """Did a pooled connection the upstream closed while idle fail this try, before
        any response byte, with the one more go on another connection still left?"""
        return self.reused and self.race_left and error.kind is _ERROR and not self.ex.conn.closed

    def failed(self, error: Any) -> tuple[str, Any, None] | None:
        """Book a failure. None when the client has been dealt with (gone, or cut because
        the response had started), else what the exchange weighs for a retry."""
        ex = self.ex
        conn = ex.conn
        server = self.server
        seconds: cython.double = ex.clock() - self.started
        entry = self.entry
        headless = entry is None  # failed before a response head came
        if headless:
            entry = {"server": server.label, "outcome": error.kind, "ms": round(seconds * 1000, 2)}
            _log_attempt(ex, entry)
        else:  # failed mid-body: still one attempt (and one upstream request), now failed
            entry.update(status=entry["outcome"], outcome=error.kind, ms=round(seconds * 1000, 2))
        if conn.closed:
            ex.client_gone()
            return None
        if headless:
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
        """The exchange ended well: the connection may serve another. (The client stays
        tied to it until its request is done: release only right before that, or untie.)"""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            self.server.pool.release(upstream)

    def settle(self) -> None:
        if self.settled:
            return
        self.settled = True
        ex = self.ex
        # The client connection unties it itself when the request is done (or crashed);
        # between tries the one it holds is over already, and aborting it again is nothing.
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()
        server = self.server
        server.in_flight -= 1
        self.metrics.in_flight_dec()
        elapsed: cython.double = ex.clock() - self.started
        ex.upstream_seconds += elapsed
        server.stats.record(elapsed, self.verdict is False)
        verdict = self.verdict
        if verdict is True:
            server.breaker.record_success()
        elif verdict is False:
            server.breaker.record_failure()
        else:
            server.breaker.release()


@cython.cfunc
def _log_attempt(ex: ExchangeState, entry: dict) -> None:
    """One try, as the access log and the trace list it."""
    attempts = ex.attempts
    if attempts:
        attempts.append(entry)
    else:  # the first try: the exchange holds an empty tuple until now
        ex.attempts = [entry]
