"""Rolling per-server statistics for ``/status`` and the live page.

Theory of operation
-------------------
Prometheus keeps the long history; ``/status`` only needs "how is this server doing right
now": error rate and p50/p99 latency over the last ``window`` seconds, and the request
rate over the last ``rate_window`` seconds (shorter, so a chart of it follows the traffic).
``RollingStats`` keeps one bucket per second in a ring. A bucket holds a count, a failure
count and a small fixed latency histogram (log-spaced bounds, 25% apart), so
``record()`` is O(1) with no allocation except when a new second starts, memory is fixed
per server whatever the traffic, and quantiles come from merging the live buckets.
A bucket is recognised as stale by the second it was last written for, so nothing needs
to run in the background to expire old data.

The rate divides what the live buckets counted by the time they cover: the whole seconds
before this one plus the part of the current second gone by (or the server's age, if
shorter). Dividing by the nominal window instead would count a partly filled current
second as a whole one and draw a sawtooth under steady traffic.

Attempts are counted when they end. The status page's chart sums these same per-server
rates, so the chart and the table can never tell two different stories.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable

try:
    import cython
except ModuleNotFoundError:  # run as Python where Cython is not installed
    from proxy import cythonshim as cython

# Latency histogram bounds in seconds: 0.1 ms .. ~60 s, each 1.25x the previous one.
# Quantiles read from it are within one step (25%) of the truth and usually far closer
# once a bucket holds a few samples: plenty for a dashboard. Prometheus histograms
# remain the place for precise SLO maths.
_MIN_LATENCY = 0.0001
_GROWTH = 1.25
_LATENCY_BOUNDS = tuple(_MIN_LATENCY * _GROWTH**i for i in range(61))

RATE_WINDOW = 10.0  # seconds the request rate is averaged over


@cython.cclass
class _Bucket:
    """What happened during one second."""

    second = cython.declare(cython.longlong, visibility="readonly")
    count = cython.declare(cython.longlong, visibility="readonly")
    failures = cython.declare(cython.longlong, visibility="readonly")
    latency_counts = cython.declare(list, visibility="readonly")

    def __init__(self, second: int) -> None:
        self.second = second
        self.count = 0
        self.failures = 0
        # One slot per bound plus an overflow slot for anything slower than the last.
        self.latency_counts = [0] * (len(_LATENCY_BOUNDS) + 1)


@cython.cclass
class RollingStats:
    """Request rate, error rate and latency quantiles over a sliding window.

    ``window``: seconds covered (default 60, one-second resolution).
    ``rate_window``: seconds the request rate covers (default 10, at most ``window``).
    ``clock``: monotonic seconds, injected so tests control time.

    Compiled (proxy/compiled.py), ``record()``, called once per attempt, works on C fields.
    """

    window = cython.declare(cython.double, visibility="readonly")
    _clock = cython.declare(object)
    _slots = cython.declare(cython.Py_ssize_t)
    _rate_slots = cython.declare(cython.Py_ssize_t)
    _ring = cython.declare(list)
    _started = cython.declare(cython.double)

    def __init__(
        self,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        rate_window: float = RATE_WINDOW,
    ):
        if window < 1:
            raise ValueError(f"window must be at least 1 second (got {window})")
        if rate_window < 1:
            raise ValueError(f"rate_window must be at least 1 second (got {rate_window})")
        self.window = float(window)
        self._clock = clock
        self._slots = math.ceil(window)
        self._rate_slots = min(self._slots, math.ceil(rate_window))
        self._ring: list[_Bucket | None] = [None] * self._slots
        self._started = clock()

    def record(self, duration: float, failed: bool) -> None:
        """Count one finished attempt: its latency in seconds and whether it failed."""
        second: cython.longlong = int(self._clock())
        index: cython.Py_ssize_t = second % self._slots
        bucket: _Bucket = self._ring[index]
        if bucket is None or bucket.second != second:
            bucket = _Bucket(second)
            self._ring[index] = bucket
        bucket.count += 1
        if failed:
            bucket.failures += 1
        bucket.latency_counts[bisect_left(_LATENCY_BOUNDS, duration)] += 1

    def snapshot(self) -> dict[str, float | None]:
        """``request_rate`` (/s), ``error_rate`` (0..1), ``p50_ms``, ``p99_ms`` (None if idle)."""
        now = self._clock()
        now_second = int(now)
        live = self._live_buckets(now_second)
        count = sum(bucket.count for bucket in live)
        if count == 0:
            return {"request_rate": 0.0, "error_rate": 0.0, "p50_ms": None, "p99_ms": None}
        failures = sum(bucket.failures for bucket in live)
        merged = [sum(column) for column in zip(*(b.latency_counts for b in live), strict=True)]
        return {
            "request_rate": round(self._rate(live, now, now_second), 3),
            "error_rate": round(failures / count, 4),
            "p50_ms": _to_ms(_quantile(merged, count, 0.50)),
            "p99_ms": _to_ms(_quantile(merged, count, 0.99)),
        }

    def _rate(self, live: list[_Bucket], now: float, now_second: int) -> float:
        oldest = now_second - self._rate_slots + 1
        count = sum(bucket.count for bucket in live if bucket.second >= oldest)
        # The time those buckets cover: the server cannot have been asked before it
        # existed, and a rate over less than a second would be noise.
        span = max(1.0, now - max(oldest, self._started))
        return count / span

    def _live_buckets(self, now_second: int) -> list[_Bucket]:
        oldest = now_second - self._slots + 1
        return [b for b in self._ring if b is not None and oldest <= b.second <= now_second]


def _quantile(counts: list[int], total: int, q: float) -> float:
    """The q-quantile of a histogram, interpolated geometrically inside its bucket."""
    rank = q * total
    seen = 0
    for index, in_bucket in enumerate(counts):
        if in_bucket and seen + in_bucket >= rank:
            lower, upper = _bucket_range(index)
            fraction = (rank - seen) / in_bucket
            return lower * (upper / lower) ** fraction
        seen += in_bucket
    return _LATENCY_BOUNDS[-1]


def _bucket_range(index: int) -> tuple[float, float]:
    if index == 0:
        return _MIN_LATENCY / _GROWTH, _MIN_LATENCY
    if index >= len(_LATENCY_BOUNDS):  # overflow: report the last bound, no better guess
        return _LATENCY_BOUNDS[-1], _LATENCY_BOUNDS[-1]
    return _LATENCY_BOUNDS[index - 1], _LATENCY_BOUNDS[index]


def _to_ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)
