"""How a shared store that just failed is spared: skipped for a short pause.

A request on a cached route makes up to four calls to Redis (lookup, lock, store, lock
release), each bounded by its deadline. When Redis is gone or frozen, paying every
deadline in turn would make one request wait several of them; after one call fails,
the others skip Redis for ``pause`` seconds instead (a miss, a lock of its own, nothing
stored), so a request waits for Redis about one deadline at most. The first call after
the pause tries again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

PAUSE = 1.0  # seconds Redis is skipped after a failed call


class Outage:
    __slots__ = ("_clock", "_until", "pause")

    def __init__(self, pause: float = PAUSE, clock: Callable[[], float] = time.monotonic) -> None:
        self.pause = pause
        self._clock = clock
        self._until = 0.0

    def skipping(self) -> bool:
        """True while the last failure is recent: do not call Redis now."""
        return self._clock() < self._until

    def failed(self) -> None:
        self._until = self._clock() + self.pause
