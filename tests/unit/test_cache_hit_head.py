"""A plain GET hit goes out from the entry's head prepared once: the same bytes as the
general path (``send_stored`` through ``send_buffered``), and a revalidation that
replaces the stored fields is seen by the next hit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from proxy.cache.policy import Freshness
from proxy.cache.serve import HIT_STATUS, RouteCache, SharedCache, _CachedRequest, send_prepared
from proxy.cache.store import StoredResponse
from proxy.config import CacheConfig, RouteCacheConfig, RouteConfig
from proxy.dataplane.client import Request
from proxy.observability.metrics import RouteMetrics
from proxy.pipeline.exchange import Exchange
from proxy.pipeline.verdict import Verdict

NOW = 1_000_000.0
FRESH = Freshness(600.0, 3.0, NOW - 40.5, False, False, 0.0, 0.0)  # 43 s old


class ClientSide:
    """The connection's writing end: what the proxy sends, in order."""

    def __init__(self, shutting_down: bool = False) -> None:
        self.sent = b""
        self.closed = False
        self.response_started = False
        self.listener = SimpleNamespace(shutting_down=shutting_down)

    def write(self, data: bytes) -> None:
        self.sent += data

    def respond(self, head: bytes, body: bytes = b"") -> None:
        self.response_started = True
        self.sent += head + body

    def write_after(self, head: bytes, data: bytes) -> None:
        self.sent += head + data


def stored(*headers: tuple[bytes, bytes], status: int = 200, reason: bytes = b"OK"):
    fields = [(b"Content-Type", b"text/plain"), (b"Cache-Control", b"max-age=600"), *headers]
    return StoredResponse("h/a", "h/a", (), status, reason, fields, b"hello\n", FRESH)


def exchange(version: str, keep_alive: bool, extra: bytes, cookie: bytes, shutting_down: bool):
    conn = ClientSide(shutting_down)
    request = Request(conn)  # type: ignore[arg-type]
    request.method, request.target, request.path, request.host = b"GET", b"/a", b"/a", b"h"
    request.headers, request.lowered = [(b"Host", b"h")], [b"host"]
    request.version, request.keep_alive, request.request_id = version, keep_alive, b"rid-1"
    ex = Exchange(conn, request, runtime=SimpleNamespace(clock=lambda: NOW))  # type: ignore[arg-type]
    ex.route_runtime = SimpleNamespace(compress=None, compression=None)
    ex.extra_headers = extra
    ex.sticky_cookie = cookie
    return ex, conn


def route_cache() -> RouteCache:
    route = RouteConfig(name="r", upstream="u", cache=RouteCacheConfig())
    return RouteCache(route, SharedCache(CacheConfig()), route_metrics=None)


CASES = [
    ("1.1", True, b"", b"", False),
    ("1.0", True, b"", b"", False),  # a 1.0 client is told keep-alive
    ("1.1", False, b"", b"", False),  # the client said close
    ("1.1", True, b"", b"", True),  # the proxy is shutting down
    ("1.1", True, b"RateLimit-Limit: 5\r\nRateLimit-Remaining: 4\r\n", b"", False),
    ("1.1", True, b"", b"Set-Cookie: sg=abc; Path=/\r\n", False),
]


@pytest.mark.parametrize(("version", "keep_alive", "extra", "cookie", "shutting_down"), CASES)
@pytest.mark.parametrize(
    "entry",
    [
        lambda: stored(),
        lambda: stored((b"ETag", b'"v1"'), (b"Cache-Tag", b"a b")),
        lambda: stored(status=203, reason=b""),  # the reason phrase the proxy knows
        lambda: stored((b"Connection", b"x-private"), (b"X-Private", b"1")),
    ],
)
def test_the_prepared_head_sends_what_the_general_path_sends(
    entry, version, keep_alive, extra, cookie, shutting_down
):
    general_ex, general = exchange(version, keep_alive, extra, cookie, shutting_down)
    _CachedRequest(route_cache(), general_ex).send_stored(entry(), b"hit", NOW)
    prepared_ex, prepared = exchange(version, keep_alive, extra, cookie, shutting_down)
    send_prepared(prepared_ex, entry(), FRESH.age(NOW), extra + HIT_STATUS)
    assert prepared.sent == general.sent
    assert b"Age: 43\r\n" in prepared.sent
    assert prepared_ex.status == general_ex.status
    assert prepared_ex.bytes_out == general_ex.bytes_out == 6
    assert prepared_ex.request.keep_alive == general_ex.request.keep_alive
    assert prepared_ex.extra_headers == general_ex.extra_headers


def test_a_revalidation_that_replaces_the_fields_is_seen_by_the_next_hit():
    entry = stored((b"ETag", b'"v1"'))
    ex, first = exchange("1.1", True, b"", b"", False)
    send_prepared(ex, entry, 0.0, HIT_STATUS)
    assert b'ETag: "v1"\r\n' in first.sent
    entry.headers = [*entry.headers[:2], (b"ETag", b'"v2"')]  # what freshen does
    ex, second = exchange("1.1", True, b"", b"", False)
    send_prepared(ex, entry, 0.0, HIT_STATUS)
    assert b'ETag: "v2"\r\n' in second.sent and b'"v1"' not in second.sent


@pytest.mark.parametrize("ages", [(0.0, 0.4, 0.99, 1.0, 1.5), (43.2, 43.9, 44.0, 42.5, 7.0)])
def test_the_age_sent_is_each_answers_own_in_whole_seconds(ages):
    """The head with Age is kept while the Age in whole seconds stays; each answer still
    says its own (a later second, or an earlier one after a revalidation)."""
    entry = stored()
    for age in ages:
        ex, sent = exchange("1.1", True, b"", b"", False)
        send_prepared(ex, entry, age, HIT_STATUS)
        assert b"\r\nAge: %d\r\nContent-Length: 6\r\n" % int(age) in sent.sent


def test_a_fresh_hit_is_counted_and_names_its_upstream_without_joining_its_group():
    """The hit path answers before the upstream group is joined: the access log still
    names the upstream, the hit is counted (route and metric), and the answer says
    Cache-Status and Age."""
    route = RouteConfig(name="r", upstream="u", cache=RouteCacheConfig())
    shared = SharedCache(CacheConfig(), clock=lambda: NOW)
    route_metrics = RouteMetrics("r-hit-path")
    cache = RouteCache(route, shared, route_metrics)
    shared.store.put_now(stored())
    for answer in (1, 2):
        ex, sent = exchange("1.1", True, b"", b"", False)
        ex.trace = None
        assert cache.on_request(ex) is Verdict.ANSWERED
        assert ex.group is None and ex.budget is None
        assert (ex.upstream, ex.cache_status, ex.status) == ("u", "hit", 200)
        assert b"\r\nAge: 43\r\n" in sent.sent and HIT_STATUS in sent.sent
        assert cache.counts["hit"] == answer
        assert route_metrics.cache_counter("hit").value == answer


def test_a_hit_checks_the_freshness_the_entry_has_now():
    """The prepared head keeps the freshness it was built with; a revalidation that
    replaces the freshness (even with the same fields) is what the next hit checks."""
    route = RouteConfig(name="r", upstream="u", cache=RouteCacheConfig())
    shared = SharedCache(CacheConfig(), clock=lambda: NOW)
    cache = RouteCache(route, shared, RouteMetrics("r-hit-freshness"))
    entry = stored()
    shared.store.put_now(entry)
    fresh_hits = cache.fresh_hits
    assert fresh_hits is not None
    ex, _ = exchange("1.1", True, b"", b"", False)
    assert fresh_hits.lookup(ex) is entry
    assert fresh_hits.answer(ex, entry)
    entry.freshness = Freshness(10.0, 0.0, NOW - 60.0, False, False, 0.0, 0.0)  # stale now
    ex, sent = exchange("1.1", True, b"", b"", False)
    assert not fresh_hits.answer(ex, entry)
    assert sent.sent == b""
    entry.freshness = Freshness(600.0, 0.0, NOW - 5.0, False, True, 0.0, 0.0)  # no-cache
    assert not fresh_hits.answer(ex, entry)
    entry.freshness = Freshness(600.0, 0.0, NOW - 5.0, False, False, 0.0, 0.0)
    assert fresh_hits.answer(ex, entry)
    assert b"\r\nAge: 5\r\n" in sent.sent


def test_only_a_plain_get_for_a_lone_variant_is_looked_up_on_the_hit_path():
    route = RouteConfig(name="r", upstream="u", cache=RouteCacheConfig())
    shared = SharedCache(CacheConfig(), clock=lambda: NOW)
    fresh_hits = RouteCache(route, shared, RouteMetrics("r-hit-lookup")).fresh_hits
    assert fresh_hits is not None
    entry = stored()
    shared.store.put_now(entry)
    ex, _ = exchange("1.1", True, b"", b"", False)
    assert fresh_hits.lookup(ex) is entry and entry.frequency == 1  # a use, for eviction
    for method, lowered in ((b"HEAD", [b"host"]), (b"GET", [b"host", b"if-none-match"])):
        ex, _ = exchange("1.1", True, b"", b"", False)
        ex.request.method, ex.request.lowered = method, lowered
        assert fresh_hits.lookup(ex) is None
    second = StoredResponse("h/a", "h/a", ((b"accept", b"x"),), 200, b"OK", [], b"", FRESH)
    shared.store.put_now(second)  # a second variant: the general path chooses
    ex, _ = exchange("1.1", True, b"", b"", False)
    assert fresh_hits.lookup(ex) is None
