"""Prometheus metrics for Sluicegate: the names and label sets of SPEC "Metrics".

Theory of operation
-------------------
Every metric object lives at module level in the default registry. The request path
never calls ``.labels()``: the runtime builds one ``RouteMetrics`` per route and one
``ServerMetrics`` per server when a config generation is loaded, and those objects hold
the resolved label children. Label values are config names and bounded sets (HTTP
methods folded to a known list, status codes, failure kinds), so no client-controlled
string ever becomes a label value and the number of series stays bounded.

Multiple workers
----------------
With ``workers > 1`` each process counts on its own and ``/metrics`` must show the sum.
prometheus-client's multiprocess mode does that through per-process files in the
directory named by ``PROMETHEUS_MULTIPROC_DIR``. prometheus-client picks its storage
when it is first imported, so the daemon sets that variable *before* importing this
module; ``render()`` then merges every process's files. The supervisor calls
``mark_process_dead(pid)`` when a worker exits so the ``live*`` gauges forget it.
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_left

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client import values as prometheus_values

from proxy.breaker import BreakerState

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Proxy latencies span a cache hit behind a fast upstream (~1 ms) to a slow report
# endpoint near the default read timeout (30 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# Methods that get their own label value; anything else (WebDAV verbs, garbage that
# still parsed) is folded into "OTHER" so clients cannot mint new series.
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)
OTHER_METHOD = "OTHER"
# Label value by method as the engine hands it over (bytes) or as text; one dict lookup.
_METHOD_LABELS: dict[str | bytes, str] = {m: m for m in KNOWN_METHODS} | {
    m.encode(): m for m in KNOWN_METHODS
}

# `_created` series double the series count and nobody alerts on them.
disable_created_metrics()


class _LoopValue:
    """prometheus-client's value without its mutex, for one process's event loop.

    Every update happens on the event loop thread; the only other reader is the render
    in a worker thread, which may see a value one update old. The mutex cost more than
    the arithmetic on every request (3 to 8 updates each).
    """

    __slots__ = ("_exemplar", "_value")
    _multiprocess = False

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._value = 0.0
        self._exemplar = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: object) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> object:
        return self._exemplar


def multiprocess_enabled() -> bool:
    """True when prometheus-client writes per-process files (set before import)."""
    return bool(os.environ.get(MULTIPROC_DIR_ENV))


if not multiprocess_enabled():
    prometheus_values.ValueClass = _LoopValue


REQUESTS = Counter(
    "sluicegate_requests",
    "Requests answered by the proxy, by route, method and status.",
    ["route", "method", "status"],
)
REQUEST_DURATION = Histogram(
    "sluicegate_request_duration_seconds",
    "Time from request head received to response complete, by route.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_REQUESTS = Counter(
    "sluicegate_upstream_requests",
    "Attempts sent to upstream servers, by response status or failure kind.",
    ["upstream", "server", "status"],
)
UPSTREAM_RESPONSE = Histogram(
    "sluicegate_upstream_response_seconds",
    "Time from attempt start to the upstream response head.",
    ["upstream", "server"],
    buckets=LATENCY_BUCKETS,
)
# In-flight requests and open connections add up across workers, and a dead worker's
# requests are gone: "livesum".
UPSTREAM_IN_FLIGHT = Gauge(
    "sluicegate_upstream_in_flight",
    "Requests in flight to an upstream server.",
    ["upstream", "server"],
    multiprocess_mode="livesum",
)
# Each worker judges health on its own. "livemin" reports a server down as soon as any
# live worker stopped sending it traffic, which is what an operator alerts on; the
# workers agree again within one check interval.
UPSTREAM_HEALTHY = Gauge(
    "sluicegate_upstream_healthy",
    "1 when the server's active health check says up (or has not reported), else 0.",
    ["upstream", "server"],
    multiprocess_mode="livemin",
)
# Breakers are per worker too; "livemax" shows the worst state any live worker holds
# (open beats half_open beats closed), so an open breaker is never averaged away.
BREAKER_STATE = Gauge(
    "sluicegate_circuit_breaker_state",
    "Circuit breaker state: 0 closed, 1 half_open, 2 open.",
    ["upstream", "server"],
    multiprocess_mode="livemax",
)
BREAKER_TRANSITIONS = Counter(
    "sluicegate_circuit_breaker_transitions",
    "Circuit breaker state changes, by the state entered.",
    ["upstream", "server", "to"],
)
RETRIES = Counter(
    "sluicegate_retries",
    "Attempts retried on another server, by the failure that caused the retry.",
    ["upstream", "reason"],
)
RATE_LIMITED = Counter(
    "sluicegate_rate_limited",
    "Requests over their route's rate limit (rejected, or counted in shadow mode).",
    ["route"],
)
RATE_LIMIT_BACKEND_ERRORS = Counter(
    "sluicegate_rate_limit_backend_errors",
    "Rate limit checks where Redis failed or was slower than redis.timeout.",
)
HEALTH_CHECKS = Counter(
    "sluicegate_health_checks",
    "Active health check probes, by result.",
    ["upstream", "server", "result"],
)
CONFIG_RELOADS = Counter(
    "sluicegate_config_reloads",
    "Configuration reloads, by result (success or failure).",
    ["result"],
)
DNS_RESOLUTIONS = Counter(
    "sluicegate_dns_resolutions",
    "DNS lookups of servers with `resolve`, by result (success, empty, failure).",
    ["upstream", "result"],
)
OPEN_CONNECTIONS = Gauge(
    "sluicegate_open_connections",
    "Client connections currently open.",
    multiprocess_mode="livesum",
)
# Autoscaling signals. In-flight requests add up over workers like open connections.
IN_FLIGHT_REQUESTS = Gauge(
    "sluicegate_in_flight_requests",
    "Client requests being served: head received, answer not yet complete.",
    multiprocess_mode="livesum",
)
# A loop that runs its timers late is saturated whatever the CPU graph says (one core per
# process): from "fine" (under a millisecond) to "requests wait seconds".
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
EVENT_LOOP_LAG = Histogram(
    "sluicegate_event_loop_lag_seconds",
    "How late the event loop ran a timer it had scheduled (one every 0.25 s).",
    buckets=LOOP_LAG_BUCKETS,
)
CACHE_REQUESTS = Counter(
    "sluicegate_cache_requests",
    "Requests on cached routes, by what the cache did (hit, miss, stale, revalidated, "
    "coalesced, bypass).",
    ["route", "result"],
)
CACHE_STORED_BYTES = Gauge(
    "sluicegate_cache_stored_bytes",
    "Bytes of responses held by the cache store.",
    multiprocess_mode="livesum",
)
CACHE_OBJECTS = Gauge(
    "sluicegate_cache_objects",
    "Responses held by the cache store.",
    multiprocess_mode="livesum",
)
CACHE_EVICTIONS = Counter(
    "sluicegate_cache_evictions",
    "Responses the cache store evicted to stay within max_size.",
)
CACHE_PURGED = Counter(
    "sluicegate_cache_purged",
    "Stored responses removed, by how (url, prefix, tag, invalidation).",
    ["by"],
)
COMPRESSED_RESPONSES = Counter(
    "sluicegate_compressed_responses",
    "Responses compressed on the fly, by route and algorithm.",
    ["route", "algorithm"],
)


class _BufferedValue(_LoopValue):
    """Multiprocess mode: a hot value counted in memory and flushed to its file.

    The request path adds with ``value._value += n``: on a ``_LoopValue`` that is plain
    attribute arithmetic, no call at all (3 to 8 of them per request). A file-backed value
    costs a lock and an mmap write per update instead (11 us per request, measured), so
    in multiprocess mode the hot values count here and ``flush()`` hands the difference
    to the file: periodically, when this worker renders, and when the supervisor asks.
    """

    __slots__ = ("_flushed", "_target")

    def __init__(self, target: object) -> None:
        super().__init__()
        self._target = target
        self._flushed = 0.0


# By id() of the file-backed value: one buffer per series however many config generations
# resolve it (label children live as long as the process in multiprocess mode).
_buffered: dict[int, _BufferedValue] = {}
_flush_lock = threading.Lock()
FLUSH_SECONDS = 1.0  # how stale a worker's series may be in the files between renders


def flush() -> None:
    """Write what the hot values counted since the last flush to the multiprocess files."""
    with _flush_lock:  # the loop's timer and a render thread may both flush
        for value in list(_buffered.values()):
            delta = value._value - value._flushed
            if delta:
                value._target.inc(delta)  # type: ignore[attr-defined]
                value._flushed += delta


def _hot(child: object) -> object:
    """The value of a counter or gauge child, to add to with ``._value += n``.

    prometheus-client's ``inc`` validates its argument and observability on every call;
    the request path only ever adds known-good amounts. This reads the library's value
    objects (``_value``, a histogram's ``_buckets``/``_sum``), hence the upper bound on its
    version in pyproject.toml; the unit tests read every series back through the registry.
    """
    return _hot_value(child._value)  # type: ignore[attr-defined]


def _hot_value(value: object) -> object:
    if type(value) is _LoopValue:
        return value
    buffered = _buffered.get(id(value))
    if buffered is None:
        buffered = _buffered[id(value)] = _BufferedValue(value)
    return buffered


class _HotHistogram:
    """A histogram child's sum and buckets as hot values: one bisect per observation."""

    __slots__ = ("bounds", "buckets", "total")

    def __init__(self, child: object) -> None:
        self.bounds = list(child._upper_bounds)  # type: ignore[attr-defined]
        buckets = child._buckets  # type: ignore[attr-defined]
        self.buckets = [_hot_value(bucket) for bucket in buckets]
        self.total = _hot_value(child._sum)  # type: ignore[attr-defined]


class RouteMetrics:
    """The per-route series, resolved once per route when a config is loaded."""

    __slots__ = (
        "_cache_results",
        "_compressed",
        "_duration",
        "_rate_limited",
        "_requests",
        "route",
    )

    def __init__(self, route: str) -> None:
        self.route = route
        self._cache_results: dict[str, object] = {}  # result word -> counter child
        self._compressed: dict[str, object] = {}  # algorithm -> counter child
        self._duration = _HotHistogram(REQUEST_DURATION.labels(route))
        self._rate_limited = RATE_LIMITED.labels(route)
        # (method label, status) -> counter value. Bounded: ~10 methods x status codes.
        self._requests: dict[tuple[str, int], object] = {}

    def observe(self, method: str | bytes, status: int, duration: float) -> None:
        """Count one answered request and its total duration in seconds.

        ``method`` is text or the raw bytes of the request line (the HTTP engine's form).
        """
        key = (_METHOD_LABELS.get(method, OTHER_METHOD), status)
        count = self._requests.get(key)
        if count is None:
            count = self._requests[key] = _hot(REQUESTS.labels(self.route, key[0], str(status)))
        count._value += 1
        histogram = self._duration
        histogram.total._value += duration
        histogram.buckets[bisect_left(histogram.bounds, duration)]._value += 1

    def rate_limited(self) -> None:
        """Count one request over the route's limit."""
        self._rate_limited.inc()

    def cache_result(self, result: str) -> None:
        """Count one request on a cached route by what the cache did."""
        child = self._cache_results.get(result)
        if child is None:
            child = self._cache_results[result] = CACHE_REQUESTS.labels(self.route, result)
        child.inc()  # type: ignore[attr-defined]

    def compressed(self, algorithm: str) -> None:
        child = self._compressed.get(algorithm)
        if child is None:
            child = self._compressed[algorithm] = COMPRESSED_RESPONSES.labels(self.route, algorithm)
        child.inc()  # type: ignore[attr-defined]


class ServerMetrics:
    """The per-server series (``server`` is the "host:port" label).

    Built for every server of a config generation. A server that stays across a reload
    may get a new ``ServerMetrics``: it resolves to the same series, so nothing resets.
    Starts as healthy (an unchecked server is eligible) with a closed breaker.
    """

    __slots__ = (
        "_breaker_state",
        "_health_checks",
        "_healthy",
        "_in_flight",
        "_response_seconds",
        "_responses",
        "_transitions",
        "server",
        "upstream",
    )

    def __init__(self, upstream: str, server: str) -> None:
        self.upstream = upstream
        self.server = server
        self._in_flight = _hot(UPSTREAM_IN_FLIGHT.labels(upstream, server))
        self._healthy = UPSTREAM_HEALTHY.labels(upstream, server)
        self._breaker_state = BREAKER_STATE.labels(upstream, server)
        self._response_seconds = _HotHistogram(UPSTREAM_RESPONSE.labels(upstream, server))
        # Caches keyed by status code / failure kind / state / result: all bounded sets.
        self._responses: dict[str | int, object] = {}
        self._transitions: dict[str, object] = {}
        self._health_checks: dict[str, object] = {}
        self._healthy.set(1)

    def in_flight_inc(self) -> None:
        self._in_flight._value += 1

    def in_flight_dec(self) -> None:
        self._in_flight._value -= 1

    def response(self, status_or_kind: str | int, seconds_to_head: float | None) -> None:
        """Count one attempt by its status code or failure kind ("error", "timeout", ...).

        ``seconds_to_head`` is the time to the response head; None when no head came.
        """
        count = self._responses.get(status_or_kind)
        if count is None:
            count = _hot(UPSTREAM_REQUESTS.labels(self.upstream, self.server, str(status_or_kind)))
            self._responses[status_or_kind] = count
        count._value += 1
        if seconds_to_head is not None:
            histogram = self._response_seconds
            histogram.total._value += seconds_to_head
            histogram.buckets[bisect_left(histogram.bounds, seconds_to_head)]._value += 1

    def set_healthy(self, healthy: bool) -> None:
        self._healthy.set(1 if healthy else 0)

    def set_breaker(self, state: BreakerState) -> None:
        """Set the breaker gauge to the state's `gauge_value` (0 closed, 1 half_open, 2 open)."""
        self._breaker_state.set(state.gauge_value)

    def breaker_transition(self, to: BreakerState) -> None:
        """Count a breaker state change into ``to``, labelled by the state's value."""
        to = to.value
        child = self._transitions.get(to)
        if child is None:
            child = self._transitions[to] = BREAKER_TRANSITIONS.labels(
                self.upstream, self.server, to
            )
        child.inc()

    def health_check(self, result: str) -> None:
        """Count one health probe by result (e.g. "success", "failure", "timeout")."""
        child = self._health_checks.get(result)
        if child is None:
            child = self._health_checks[result] = HEALTH_CHECKS.labels(
                self.upstream, self.server, result
            )
        child.inc()

    def retire(self) -> None:
        """Drop this server's gauge series; call only for servers that left the config.

        Counters stay (Prometheus handles counters that stop moving). Gauges of a removed
        server would otherwise report its last state forever and keep alerts firing.
        Per-process files cannot be edited in multiprocess mode, so this is a no-op there.
        """
        if multiprocess_enabled():
            return
        labels = (self.upstream, self.server)
        for gauge in (UPSTREAM_IN_FLIGHT, UPSTREAM_HEALTHY, BREAKER_STATE):
            gauge.remove(*labels)


class _LabelCache:
    """Children of one metric keyed by label tuple, for helpers called with names."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], object] = {}

    def get(self, *labels: str):
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


_retries = _LabelCache(RETRIES)
_dns_resolutions = _LabelCache(DNS_RESOLUTIONS)
_rate_limit_backend_errors = RATE_LIMIT_BACKEND_ERRORS
# Both results exist from the start so "rate of failures" alerts have a series to read.
_reload_results = {True: CONFIG_RELOADS.labels("success"), False: CONFIG_RELOADS.labels("failure")}
# The request path adds to it with ``._value += 1`` / ``-= 1`` (see ``_hot``).
in_flight_requests = _hot(IN_FLIGHT_REQUESTS)


def retry(upstream: str, reason: str) -> None:
    """Count one retry on ``upstream`` caused by ``reason`` (a failure kind)."""
    _retries.get(upstream, reason).inc()


def dns_resolution(upstream: str, result: str) -> None:
    """Count one DNS lookup for ``upstream``: "success", "empty" or "failure"."""
    _dns_resolutions.get(upstream, result).inc()


_purged = _LabelCache(CACHE_PURGED)


def cache_store(objects: int, stored_bytes: int, new_evictions: int) -> None:
    """The cache store's size after a change, and evictions since the last report."""
    CACHE_OBJECTS.set(objects)
    CACHE_STORED_BYTES.set(stored_bytes)
    if new_evictions:
        CACHE_EVICTIONS.inc(new_evictions)


def cache_purged(by: str, count: int) -> None:
    if count:
        _purged.get(by).inc(count)


def rate_limit_backend_error() -> None:
    _rate_limit_backend_errors.inc()


def config_reload(success: bool) -> None:
    _reload_results[bool(success)].inc()


def observe_event_loop_lag(seconds: float) -> None:
    EVENT_LOOP_LAG.observe(seconds)


def open_connections_inc() -> None:
    OPEN_CONNECTIONS.inc()


def open_connections_dec() -> None:
    OPEN_CONNECTIONS.dec()


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition for ``/metrics``: (body, content type).

    In multiprocess mode a fresh registry merges every worker's files; the default
    registry would only show this process (and process_* collectors that lie there).
    """
    if multiprocess_enabled():
        flush()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Tell the multiprocess store that worker ``pid`` exited (no-op in one process)."""
    if multiprocess_enabled():
        multiprocess.mark_process_dead(pid)
