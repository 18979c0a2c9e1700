"""Rate limiting as a request filter: the route's bucket for the client's key.

The memory limiter decides at once; the Redis one answers a batch a tick later, so the
filter suspends the exchange on the pending check and ``resume`` applies the decision.
Over the limit in ``enforce`` mode is a 429 with ``Retry-After``; Redis down with the rule
saying ``deny`` is a 503 (the limiter is unavailable, the client is not over anything).
Every answer that passes carries the ``RateLimit-*`` fields.
"""

from __future__ import annotations

import math
from typing import Any

from proxy.pipeline.answer import send_error
from proxy.pipeline.routing import cookie_value
from proxy.pipeline.verdict import Verdict
from proxy.ratelimit.bucket import Decision

_CONTINUE = Verdict.CONTINUE
_ANSWERED = Verdict.ANSWERED


class RateLimitFilter:
    __slots__ = ("key_kind", "key_name", "name", "route", "rule")

    def __init__(self, route: Any) -> None:
        self.route = route
        self.name = route.name
        self.rule = route.rate_limit
        self.key_kind = route.limit_key_kind
        self.key_name = route.limit_key_name

    def on_request(self, ex: Any) -> Verdict:
        ex.limit_key = key = self.client_key(ex.request, ex.runtime)
        pending = ex.runtime.limiter.begin_check(self.name, key, self.rule)
        if isinstance(pending, Decision):
            return self.apply(ex, pending)
        ex.suspend(pending)  # Redis answers the batch a tick later
        return Verdict.SUSPENDED

    def resume(self, ex: Any, pending: Any) -> Verdict:
        decision = ex.runtime.limiter.decided(pending, self.name, ex.limit_key, self.rule)
        if ex.conn.closed:  # gone while Redis answered: logged as gone, not as limited
            ex.client_gone()
            return _ANSWERED
        return self.apply(ex, decision)

    def client_key(self, request: Any, runtime: Any) -> str:
        kind = self.key_kind
        if kind == "route":
            return ""
        if kind == "header":
            value = request.header(self.key_name)
            if value:
                return "h:" + value.decode("latin-1")
        elif kind == "cookie":
            value = cookie_value(request.header(b"cookie"), self.key_name)
            if value:
                return "c:" + value.decode("latin-1")
        return runtime.client_ip(request)

    def apply(self, ex: Any, decision: Decision) -> Verdict:
        """Go on, or answer: 429 over the limit, 503 when Redis is down and the rule
        says deny."""
        rule = self.rule
        route = self.route
        if ex.trace is not None:
            ex.trace["rate_limit"] = {
                "allowed": decision.allowed,
                "remaining": decision.remaining,
                "limit": decision.limit,
                "mode": rule.mode,
                "backend_failed": decision.backend_failed,
            }
        if decision.backend_failed:
            # Redis failed and `allow`/`deny` decided without a bucket: no counts to tell,
            # and a `deny` is the limiter being down (503), not the client over its limit.
            if not decision.allowed and rule.mode == "enforce":
                send_error(ex, 503, "rate limiter unavailable", _cache_bypassed(ex))
                return _ANSWERED
            return _CONTINUE
        ex.extra_headers = rate_limit_headers(decision)
        if not decision.allowed:
            ex.rate_limited = True
            route.metrics.rate_limited()
            route.counters.rate_limited += 1
            if rule.mode == "enforce":
                retry_after = b"Retry-After: %d\r\n" % max(1, math.ceil(decision.retry_after))
                extra = ex.extra_headers + retry_after + _cache_bypassed(ex)
                send_error(ex, 429, "rate limited", extra)
                return _ANSWERED
        return _CONTINUE


def _cache_bypassed(ex: Any) -> bytes:
    """On a cached route, an answer the cache never saw still carries Cache-Status."""
    cache = ex.route_runtime.cache
    return cache.bypassed(ex) if cache is not None else b""


def rate_limit_headers(decision: Any) -> bytes:
    return b"RateLimit-Limit: %d\r\nRateLimit-Remaining: %d\r\nRateLimit-Reset: %d\r\n" % (
        decision.limit,
        max(0, decision.remaining),
        math.ceil(decision.reset_after),
    )
