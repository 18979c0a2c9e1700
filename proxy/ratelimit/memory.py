"""In-process token buckets: the backend without Redis, and the ``local`` fallback.

Invariants:
- At most ``max_keys`` buckets are held. Past that the least recently used bucket is
  evicted; an evicted client simply starts again with a full bucket, the same as a new one.
- A bucket that has refilled to full carries no information (a missing bucket is full), so
  it may be dropped at any time. Each check that creates a bucket looks at the least
  recently used ones and drops those full by now: an O(1) lazy sweep, no timer, no scan.
- Per process and per event loop: not thread-safe, no awaits on the hot path.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from proxy.ratelimit.bucket import Decision, take

# How many least-recently-used buckets one check may sweep. More than one, so the sweep
# keeps up with checks that create new buckets; small, so a check stays O(1).
SWEEP_PER_CHECK = 2


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated_at: float
    full_at: float  # clock time at which it is full again: past this it may be dropped


class MemoryBackend:
    """Token buckets in an LRU-ordered dict, bounded by ``max_keys``."""

    def __init__(
        self, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1 (got {max_keys})")
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def allow_now(self, key: str, rate: float, burst: int, cost: int = 1) -> Decision:
        """Check and update ``key``'s bucket synchronously (the proxy's hot path)."""
        now = self._clock()
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            decision, left = take(burst, now, now, rate, burst, cost)
            self._sweep(now)
            buckets[key] = _Bucket(left, now, now + decision.reset_after)
            if len(buckets) > self.max_keys:
                buckets.popitem(last=False)
            return decision
        decision, left = take(bucket.tokens, bucket.updated_at, now, rate, burst, cost)
        bucket.tokens = left
        bucket.updated_at = max(bucket.updated_at, now)
        bucket.full_at = now + decision.reset_after
        buckets.move_to_end(key)
        return decision

    async def allow(self, key: str, rate: float, burst: int, cost: int = 1) -> Decision:
        return self.allow_now(key, rate, burst, cost)

    def _sweep(self, now: float) -> None:
        buckets = self._buckets
        for _ in range(SWEEP_PER_CHECK):
            if not buckets:
                return
            oldest_key = next(iter(buckets))
            if buckets[oldest_key].full_at > now:
                return
            del buckets[oldest_key]
