"""One coarse periodic sweep per event loop instead of a timer per request.

Connections keep a ``deadline`` (0 = none) computed from ``Sweeper.now``, a clock refreshed
every tick (nginx caches its time the same way). Each tick calls ``on_deadline`` for every
watched object whose deadline has passed. Precision is one tick, which suits timeouts
measured in seconds; arming a deadline costs one addition on the hot path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

TICK_SECONDS = 0.05


class Deadlined(Protocol):
    deadline: float

    def on_deadline(self) -> None: ...


class Sweeper:
    """The clock is the loop's unless one is injected: a test then moves time by hand and
    calls ``sweep()`` itself, so a timeout fires at once without a real wait."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        tick: float = TICK_SECONDS,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._loop = loop
        self._tick = tick
        self._clock = clock or loop.time
        self._watched: set[Deadlined] = set()
        self.now = self._clock()
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._handle is None:
            self._handle = self._loop.call_later(self._tick, self._sweep)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def watch(self, item: Deadlined) -> None:
        self._watched.add(item)

    def unwatch(self, item: Deadlined) -> None:
        self._watched.discard(item)

    def refresh(self) -> float:
        self.now = self._clock()
        return self.now

    def sweep(self) -> None:
        """One pass: read the clock, and call ``on_deadline`` of each item now past due."""
        now = self.now = self._clock()
        expired = [item for item in self._watched if 0 < item.deadline <= now]
        for item in expired:
            item.deadline = 0.0
            item.on_deadline()

    def _sweep(self) -> None:
        self.sweep()
        self._handle = self._loop.call_later(self._tick, self._sweep)


_sweepers: dict[asyncio.AbstractEventLoop, Sweeper] = {}


def sweeper_for(loop: asyncio.AbstractEventLoop) -> Sweeper:
    sweeper = _sweepers.get(loop)
    if sweeper is None or loop.is_closed():
        sweeper = _sweepers[loop] = Sweeper(loop)
        sweeper.start()
    return sweeper
