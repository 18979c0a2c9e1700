"""Filters: the per-route steps of the request lifecycle, composed when a config loads.

A route's ``request_filters`` run in order in the ``REQUEST_FILTERS`` phase (rate limit,
then the cache lookup), Traefik-middleware style. Each is a small long-lived object; its
``on_request(ex)`` says what became of the request:

- ``Verdict.CONTINUE``: on to the next filter, then upstream;
- ``Verdict.ANSWERED``: the filter answered the client (429, a cache hit): done;
- ``Verdict.SUSPENDED``: the filter waits for something (a Redis batch, a cache lookup,
  the stampede lock's leader) and has called ``ex.suspend(future)``: when the future is
  done the exchange asks the same filter's ``resume(ex, future)`` for the verdict.

Nothing per request is decided here that the config already decides: a route with no
filters has an empty tuple, and the exchange goes straight on.

Response-side filters hang off the route too: ``compression`` (the encoder a response
head asks for) and, for a cached request, the cache's response filter (the store tap,
stale-if-error), which the cache's request filter sets on the exchange.
"""

from __future__ import annotations

from typing import Any, Protocol

from proxy.pipeline.ratelimit_filter import RateLimitFilter
from proxy.pipeline.verdict import Verdict


class RequestFilter(Protocol):
    def on_request(self, ex: Any) -> Verdict: ...

    def resume(self, ex: Any, future: Any) -> Verdict: ...


def request_filters(route: Any) -> tuple[RequestFilter, ...]:
    """The route's request filters in the order they run: the limit first (a request over
    it never reaches the cache, which counts it as a bypass), then the cache."""
    chain: list[RequestFilter] = []
    if route.rate_limit is not None:
        chain.append(RateLimitFilter(route))
    if route.cache is not None:
        chain.append(route.cache)
    return tuple(chain)
