"""Prometheus metrics for Sluicegate: the names and label sets of SPEC "Metrics".

Theory of operation
-------------------
Every series is a small object of ours (`_Counter`, `_Gauge`, `_Histogram`) holding plain
numbers, kept by its family (`_Family`) under its label values. The request path never
looks a series up: the runtime builds one ``RouteMetrics`` per route and one
``ServerMetrics`` per server when a config generation is loaded, and those objects hold
the series, to which the request path adds with ``series.value += n`` (attribute
arithmetic, no call). ``/metrics`` reads them through one collector (`_Collector`, a
``prometheus_client.registry.Collector`` yielding metric families), so nothing of
prometheus-client is patched and none of its private fields is written. Label values are
config names and bounded sets (HTTP methods folded to a known list, status codes, failure
words), so no client-controlled string ever becomes a label value and the number of
series stays bounded.

Multiple workers
----------------
With ``workers > 1`` each process counts on its own and ``/metrics`` must show the sum.
prometheus-client's multiprocess mode does that through per-process files in the
directory named by ``PROMETHEUS_MULTIPROC_DIR``. prometheus-client picks its storage
when it is first imported, so the daemon sets that variable *before* importing this
module. Each family then also has a prometheus-client metric over those files, and
``flush()`` hands each request-path series' change since the last flush to it:
periodically, when this worker renders, and when the supervisor asks (a file write per
request update cost 11 us per request, measured). Series updated off the request path
(``inc``, ``set``, ``observe``: health, breaker, reloads, retries, ...) write through at
once, so the supervisor's own counts (reloads) reach the files without a flush.
``render()`` merges every process's files; the supervisor calls ``mark_process_dead(pid)``
when a worker exits so the ``live*`` gauges forget it.
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client import values as stored_values
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.balancing.breaker import BreakerState

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

FLUSH_SECONDS = 1.0  # how stale a worker's series may be in the files between renders


def multiprocess_enabled() -> bool:
    """True when prometheus-client writes per-process files (set before import)."""
    return bool(os.environ.get(MULTIPROC_DIR_ENV))


_MULTIPROCESS = multiprocess_enabled()


class _Counter:
    """One counter series. Every update happens on the event loop thread; a render in
    another thread may read a value one update old."""

    __slots__ = ("_file", "_flushed", "value")

    def __init__(self, file: Any = None) -> None:
        self.value = 0.0
        self._file = file  # the multiprocess file's series, or None in one process
        self._flushed = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Off the request path: written through to the file at once."""
        self.value += amount
        if self._file is not None:
            self.flush()

    def flush(self) -> None:
        delta = self.value - self._flushed
        if delta:
            self._file.inc(delta)
            self._flushed += delta


class _Gauge:
    __slots__ = ("_file", "_flushed", "value")

    def __init__(self, file: Any = None) -> None:
        self.value = 0.0
        self._file = file
        self._flushed = 0.0

    def set(self, value: float) -> None:
        """Off the request path: written through to the file at once."""
        self.value = value
        if self._file is not None:
            self.flush()

    def inc(self, amount: float = 1.0) -> None:
        self.set(self.value + amount)

    def flush(self) -> None:
        value = self.value
        if value != self._flushed:
            self._file.set(value)
            self._flushed = value


class _Histogram:
    """Counts per bucket (not cumulative; the last is +Inf) and the sum of observations:
    the request path adds with one bisect, the collector makes them cumulative."""

    __slots__ = ("_file", "_flushed_counts", "_flushed_total", "bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float], file: Any = None) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self._file = file
        self._flushed_counts = [0] * len(self.counts)
        self._flushed_total = 0.0

    def observe(self, value: float) -> None:
        """Off the request path: written through to the file at once."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        if self._file is not None:
            self.flush()

    def flush(self) -> None:
        file = self._file
        for index, count in enumerate(self.counts):
            delta = count - self._flushed_counts[index]
            if delta:
                file.buckets[index].inc(delta)
                self._flushed_counts[index] = count
        delta_total = self.total - self._flushed_total
        if delta_total:
            file.sum.inc(delta_total)
            self._flushed_total += delta_total


class _HistogramFile:
    """One histogram series in the multiprocess files: a value per bucket and the sum.

    prometheus-client's ``Histogram`` only observes one value at a time, and a flush adds
    a batch of bucket counts; so the series is laid out here from the same public
    ``values.ValueClass`` the client's own histogram uses, under the same sample names
    (``_bucket`` with ``le``, ``_sum``), which its ``MultiProcessCollector`` merges.
    """

    __slots__ = ("buckets", "sum")

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        labelvalues: tuple[str, ...],
        le: Sequence[str],
    ) -> None:
        self.sum = stored_values.ValueClass(
            "histogram", name, name + "_sum", labelnames, labelvalues, documentation
        )
        bucket_labels = (*labelnames, "le")
        self.buckets = [
            stored_values.ValueClass(
                "histogram",
                name,
                name + "_bucket",
                bucket_labels,
                (*labelvalues, bound),
                documentation,
            )
            for bound in le
        ]


class _Family:
    """One metric: its name, help, kind and label names, and its series by label values."""

    def __init__(
        self,
        kind: str,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float] = (),
        multiprocess_mode: str = "all",
    ) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(float(bound) for bound in buckets)
        self._le = [floatToGoString(bound) for bound in self.bounds] + ["+Inf"]
        self.series: dict[tuple[str, ...], Any] = {}
        self._files: Any = None
        if _MULTIPROCESS:
            if kind == "counter":
                self._files = Counter(name, documentation, self.labelnames)
            elif kind == "gauge":
                self._files = Gauge(
                    name, documentation, self.labelnames, multiprocess_mode=multiprocess_mode
                )
        if not self.labelnames:
            self.labels()

    def labels(self, *values: str) -> Any:
        """The series for these label values, made on first use (off the request path)."""
        series = self.series.get(values)
        if series is None:
            file = None
            if self.kind == "histogram":
                if _MULTIPROCESS:
                    file = _HistogramFile(
                        self.name, self.documentation, self.labelnames, values, self._le
                    )
            elif self._files is not None:
                file = self._files.labels(*values) if values else self._files
            if self.kind == "counter":
                series = _Counter(file)
            elif self.kind == "gauge":
                series = _Gauge(file)
            else:
                series = _Histogram(self.bounds, file)
            self.series[values] = series
        return series

    def get(self, *values: str) -> Any:
        """The series for these label values: looked up, made only the first time."""
        series = self.series.get(values)
        return series if series is not None else self.labels(*values)

    def remove(self, *values: str) -> None:
        self.series.pop(values, None)

    def flush(self) -> None:
        for series in list(self.series.values()):
            series.flush()

    def collect(self) -> Metric:
        labelnames = list(self.labelnames)
        series = list(self.series.items())  # one C-level copy: safe beside the loop thread
        if self.kind == "counter":
            family: Any = CounterMetricFamily(self.name, self.documentation, labels=labelnames)
            for values, counter in series:
                family.add_metric(values, counter.value)
        elif self.kind == "gauge":
            family = GaugeMetricFamily(self.name, self.documentation, labels=labelnames)
            for values, gauge in series:
                family.add_metric(values, gauge.value)
        else:
            family = HistogramMetricFamily(self.name, self.documentation, labels=labelnames)
            for values, histogram in series:
                cumulative, buckets = 0, []
                for le, count in zip(self._le, list(histogram.counts), strict=True):
                    cumulative += count
                    buckets.append((le, cumulative))
                family.add_metric(values, buckets, histogram.total)
        return family


_FAMILIES: list[_Family] = []


def _counter(name: str, documentation: str, labelnames: Sequence[str] = ()) -> _Family:
    family = _Family("counter", name, documentation, labelnames)
    _FAMILIES.append(family)
    return family


def _gauge(
    name: str,
    documentation: str,
    labelnames: Sequence[str] = (),
    *,
    multiprocess_mode: str = "all",
) -> _Family:
    family = _Family("gauge", name, documentation, labelnames, multiprocess_mode=multiprocess_mode)
    _FAMILIES.append(family)
    return family


def _histogram(
    name: str, documentation: str, labelnames: Sequence[str] = (), *, buckets: Sequence[float]
) -> _Family:
    family = _Family("histogram", name, documentation, labelnames, buckets=buckets)
    _FAMILIES.append(family)
    return family


class _Collector(Collector):
    """Every Sluicegate family, read from our own series at each scrape."""

    def collect(self) -> Iterator[Metric]:
        for family in _FAMILIES:
            yield family.collect()


REQUESTS = _counter(
    "sluicegate_requests",
    "Requests answered by the proxy, by route, method and status.",
    ["route", "method", "status"],
)
REQUEST_DURATION = _histogram(
    "sluicegate_request_duration_seconds",
    "Time from request head received to response complete, by route.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_REQUESTS = _counter(
    "sluicegate_upstream_requests",
    "Attempts sent to upstream servers, by response status or failure kind.",
    ["upstream", "server", "status"],
)
UPSTREAM_RESPONSE = _histogram(
    "sluicegate_upstream_response_seconds",
    "Time from attempt start to the upstream response head.",
    ["upstream", "server"],
    buckets=LATENCY_BUCKETS,
)
# In-flight requests and open connections add up across workers, and a dead worker's
# requests are gone: "livesum".
UPSTREAM_IN_FLIGHT = _gauge(
    "sluicegate_upstream_in_flight",
    "Requests in flight to an upstream server.",
    ["upstream", "server"],
    multiprocess_mode="livesum",
)
# Each worker judges health on its own. "livemin" reports a server down as soon as any
# live worker stopped sending it traffic, which is what an operator alerts on; the
# workers agree again within one check interval.
UPSTREAM_HEALTHY = _gauge(
    "sluicegate_upstream_healthy",
    "1 when the server's active health check says up (or has not reported), else 0.",
    ["upstream", "server"],
    multiprocess_mode="livemin",
)
# Breakers are per worker too; "livemax" shows the worst state any live worker holds
# (open beats half_open beats closed), so an open breaker is never averaged away.
BREAKER_STATE = _gauge(
    "sluicegate_circuit_breaker_state",
    "Circuit breaker state: 0 closed, 1 half_open, 2 open.",
    ["upstream", "server"],
    multiprocess_mode="livemax",
)
BREAKER_TRANSITIONS = _counter(
    "sluicegate_circuit_breaker_transitions",
    "Circuit breaker state changes, by the state entered.",
    ["upstream", "server", "to"],
)
RETRIES = _counter(
    "sluicegate_retries",
    "Attempts retried on another server, by the failure that caused the retry.",
    ["upstream", "reason"],
)
RATE_LIMITED = _counter(
    "sluicegate_rate_limited",
    "Requests over their route's rate limit (rejected, or counted in shadow mode).",
    ["route"],
)
RATE_LIMIT_BACKEND_ERRORS = _counter(
    "sluicegate_rate_limit_backend_errors",
    "Rate limit checks where Redis failed or was slower than redis.timeout.",
)
HEALTH_CHECKS = _counter(
    "sluicegate_health_checks",
    "Active health check probes, by result.",
    ["upstream", "server", "result"],
)
CONFIG_RELOADS = _counter(
    "sluicegate_config_reloads",
    "Configuration reloads, by result (success or failure).",
    ["result"],
)
DNS_RESOLUTIONS = _counter(
    "sluicegate_dns_resolutions",
    "DNS lookups of servers with `resolve`, by result (success, empty, failure).",
    ["upstream", "result"],
)
OPEN_CONNECTIONS = _gauge(
    "sluicegate_open_connections",
    "Client connections currently open.",
    multiprocess_mode="livesum",
)
# Autoscaling signals. In-flight requests add up over workers like open connections.
IN_FLIGHT_REQUESTS = _gauge(
    "sluicegate_in_flight_requests",
    "Client requests being served: head received, answer not yet complete.",
    multiprocess_mode="livesum",
)
# A loop that runs its timers late is saturated whatever the CPU graph says (one core per
# process): from "fine" (under a millisecond) to "requests wait seconds".
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
EVENT_LOOP_LAG = _histogram(
    "sluicegate_event_loop_lag_seconds",
    "How late the event loop ran a timer it had scheduled (one every 0.25 s).",
    buckets=LOOP_LAG_BUCKETS,
)
CACHE_REQUESTS = _counter(
    "sluicegate_cache_requests",
    "Requests on cached routes, by what the cache did (hit, miss, stale, revalidated, "
    "coalesced, bypass).",
    ["route", "result"],
)
CACHE_STORED_BYTES = _gauge(
    "sluicegate_cache_stored_bytes",
    "Bytes of responses held by the cache store.",
    multiprocess_mode="livesum",
)
CACHE_OBJECTS = _gauge(
    "sluicegate_cache_objects",
    "Responses held by the cache store.",
    multiprocess_mode="livesum",
)
CACHE_EVICTIONS = _counter(
    "sluicegate_cache_evictions",
    "Responses the cache store evicted to stay within max_size.",
)
CACHE_PURGED = _counter(
    "sluicegate_cache_purged",
    "Stored responses removed, by how (url, prefix, tag, invalidation).",
    ["by"],
)
COMPRESSED_RESPONSES = _counter(
    "sluicegate_compressed_responses",
    "Responses compressed on the fly, by route and algorithm.",
    ["route", "algorithm"],
)


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
        self._cache_results: dict[str, _Counter] = {}  # result word -> series
        self._compressed: dict[str, _Counter] = {}  # algorithm -> series
        self._duration: _Histogram = REQUEST_DURATION.labels(route)
        self._rate_limited: _Counter = RATE_LIMITED.labels(route)
        # (method label, status) -> series. Bounded: ~10 methods x status codes.
        self._requests: dict[tuple[str, int], _Counter] = {}

    def observe(self, method: str | bytes, status: int, duration: float) -> None:
        """Count one answered request and its total duration in seconds.

        ``method`` is text or the raw bytes of the request line (the HTTP engine's form).
        """
        key = (_METHOD_LABELS.get(method, OTHER_METHOD), status)
        count = self._requests.get(key)
        if count is None:
            count = self._requests[key] = REQUESTS.labels(self.route, key[0], str(status))
        count.value += 1
        histogram = self._duration
        histogram.total += duration
        histogram.counts[bisect_left(histogram.bounds, duration)] += 1

    def rate_limited(self) -> None:
        """Count one request over the route's limit."""
        self._rate_limited.inc()

    def cache_result(self, result: str) -> None:
        """Count one request on a cached route by what the cache did."""
        self.cache_counter(result).inc()

    def cache_counter(self, result: str) -> Any:
        """The counter ``cache_result(result)`` increments (a hot caller may keep it)."""
        count = self._cache_results.get(result)
        if count is None:
            count = self._cache_results[result] = CACHE_REQUESTS.labels(self.route, result)
        return count

    def compressed(self, algorithm: str) -> None:
        count = self._compressed.get(algorithm)
        if count is None:
            count = self._compressed[algorithm] = COMPRESSED_RESPONSES.labels(self.route, algorithm)
        count.inc()


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
        self._in_flight: _Gauge = UPSTREAM_IN_FLIGHT.labels(upstream, server)
        self._healthy: _Gauge = UPSTREAM_HEALTHY.labels(upstream, server)
        self._breaker_state: _Gauge = BREAKER_STATE.labels(upstream, server)
        self._response_seconds: _Histogram = UPSTREAM_RESPONSE.labels(upstream, server)
        # Caches keyed by status code / failure word / state / result: all bounded sets.
        self._responses: dict[str | int, _Counter] = {}
        self._transitions: dict[str, _Counter] = {}
        self._health_checks: dict[str, _Counter] = {}
        self._healthy.set(1)

    def in_flight_inc(self) -> None:
        self._in_flight.value += 1

    def in_flight_dec(self) -> None:
        self._in_flight.value -= 1

    def response(self, status_or_kind: str | int, seconds_to_head: float | None) -> None:
        """Count one attempt by its status code or failure word ("error", "timeout", ...).

        ``seconds_to_head`` is the time to the response head; None when no head came.
        """
        count = self._responses.get(status_or_kind)
        if count is None:
            count = UPSTREAM_REQUESTS.labels(self.upstream, self.server, str(status_or_kind))
            self._responses[status_or_kind] = count
        count.value += 1
        if seconds_to_head is not None:
            histogram = self._response_seconds
            histogram.total += seconds_to_head
            histogram.counts[bisect_left(histogram.bounds, seconds_to_head)] += 1

    def set_healthy(self, healthy: bool) -> None:
        self._healthy.set(1 if healthy else 0)

    def set_breaker(self, state: BreakerState) -> None:
        """Set the breaker gauge to the state's `gauge_value` (0 closed, 1 half_open, 2 open)."""
        self._breaker_state.set(state.gauge_value)

    def breaker_transition(self, to: BreakerState) -> None:
        """Count a breaker state change into ``to``, labelled by the state's value."""
        count = self._transitions.get(to.value)
        if count is None:
            count = self._transitions[to.value] = BREAKER_TRANSITIONS.labels(
                self.upstream, self.server, to.value
            )
        count.inc()

    def health_check(self, result: str) -> None:
        """Count one health probe by result (e.g. "success", "failure", "timeout")."""
        count = self._health_checks.get(result)
        if count is None:
            count = self._health_checks[result] = HEALTH_CHECKS.labels(
                self.upstream, self.server, result
            )
        count.inc()

    def retire(self) -> None:
        """Drop this server's gauges: it left the config (or its DNS answer).

        A removed server would otherwise report its last state forever and keep alerts
        firing. Per-process files cannot be edited in multiprocess mode, so this is a
        no-op there.
        """
        if _MULTIPROCESS:
            return
        labels = (self.upstream, self.server)
        for gauge in (UPSTREAM_IN_FLIGHT, UPSTREAM_HEALTHY, BREAKER_STATE):
            gauge.remove(*labels)


# Both results exist from the start so "rate of failures" alerts have a series to read.
_reload_results = {True: CONFIG_RELOADS.labels("success"), False: CONFIG_RELOADS.labels("failure")}
# The request path adds to it with ``.value += 1`` / ``-= 1``.
in_flight_requests: _Gauge = IN_FLIGHT_REQUESTS.labels()
_open_connections: _Gauge = OPEN_CONNECTIONS.labels()


def retry(upstream: str, reason: str) -> None:
    """Count one retry on ``upstream`` caused by ``reason`` (a failure word)."""
    RETRIES.get(upstream, str(reason)).inc()


def dns_resolution(upstream: str, result: str) -> None:
    """Count one DNS lookup for ``upstream``: "success", "empty" or "failure"."""
    DNS_RESOLUTIONS.get(upstream, result).inc()


def cache_store(objects: int, stored_bytes: int, new_evictions: int) -> None:
    """The cache store's size after a change, and evictions since the last report."""
    CACHE_OBJECTS.get().set(objects)
    CACHE_STORED_BYTES.get().set(stored_bytes)
    if new_evictions:
        CACHE_EVICTIONS.get().inc(new_evictions)


def cache_purged(by: str, count: int) -> None:
    if count:
        CACHE_PURGED.get(by).inc(count)


def rate_limit_backend_error() -> None:
    RATE_LIMIT_BACKEND_ERRORS.get().inc()


def config_reload(success: bool) -> None:
    _reload_results[bool(success)].inc()


def observe_event_loop_lag(seconds: float) -> None:
    EVENT_LOOP_LAG.get().observe(seconds)


def open_connections_inc() -> None:
    _open_connections.inc()


def open_connections_dec() -> None:
    _open_connections.inc(-1)


_flush_lock = threading.Lock()


def flush() -> None:
    """Write what every series counted since the last flush to the multiprocess files."""
    if not _MULTIPROCESS:
        return
    with _flush_lock:  # the loop's timer and a render thread may both flush
        for family in _FAMILIES:
            family.flush()


if not _MULTIPROCESS:
    REGISTRY.register(_Collector())


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition for ``/metrics``: (body, content type).

    In multiprocess mode a fresh registry merges every worker's files; the default
    registry would only show this process (and process_* collectors that lie there).
    """
    if _MULTIPROCESS:
        flush()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Tell the multiprocess store that worker ``pid`` exited (no-op in one process)."""
    if _MULTIPROCESS:
        multiprocess.mark_process_dead(pid)
