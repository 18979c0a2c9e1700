"""One coarse periodic sweep per event loop instead of a timer per request.

Connections keep a ``deadline`` (0 = none) computed from ``Sweeper.now``, a clock refreshed
every tick (nginx caches its time the same way). Each tick calls ``on_deadline`` for every
watched object whose deadline has passed. Precision is one tick, which suits timeouts
measured in seconds; arming a deadline costs one addition on the hot path.

Objects watched as ``precise`` (upstream exchanges: their read waits are clipped to the
retry time budget, which a client measures to the tens of milliseconds) compute their
deadlines from the loop's own clock and are met on time: each tick arms a one-off timer
for those due before the next one, and a deadline armed closer than the next tick asks for
its timer itself (``fire_at``). So the timer heap only ever holds deadlines about to fire.
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
        self._precise: set[Deadlined] = set()
        self.now = self._clock()
        self.next_sweep = self.now + tick  # a precise deadline before this needs fire_at()
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._handle is None:
            self.next_sweep = self._loop.time() + self._tick
            self._handle = self._loop.call_at(self.next_sweep, self._sweep)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def watch(self, item: Deadlined, *, precise: bool = False) -> None:
        self._watched.add(item)
        if precise:
            self._precise.add(item)

    def unwatch(self, item: Deadlined) -> None:
        self._watched.discard(item)
        self._precise.discard(item)

    def refresh(self) -> float:
        self.now = self._clock()
        return self.now

    def fire_at(self, item: Deadlined, deadline: float) -> None:
        """A precise ``item`` armed ``deadline`` before the next tick: meet it on time."""
        self._loop.call_at(deadline, self._fire, item, deadline)

    def _fire(self, item: Deadlined, deadline: float) -> None:
        # Only if that deadline still stands: re-armed, cleared or swept meanwhile, it is
        # not this timer's business any more.
        if item.deadline == deadline and item in self._watched:
            item.deadline = 0.0
            item.on_deadline()

    def sweep(self) -> float:
        """One pass: read the clock, and call ``on_deadline`` of each item now past due."""
        now = self.now = self._clock()
        expired = [item for item in self._watched if 0 < item.deadline <= now]
        for item in expired:
            item.deadline = 0.0
            item.on_deadline()
        return now

    def _sweep(self) -> None:
        now = self.sweep()
        self.next_sweep = soon = now + self._tick
        for item in self._precise:
            deadline = item.deadline
            if now < deadline < soon:
                self.fire_at(item, deadline)
        self._handle = self._loop.call_at(soon, self._sweep)


_sweepers: dict[asyncio.AbstractEventLoop, Sweeper] = {}


def sweeper_for(loop: asyncio.AbstractEventLoop) -> Sweeper:
    sweeper = _sweepers.get(loop)
    if sweeper is None or loop.is_closed():
        sweeper = _sweepers[loop] = Sweeper(loop)
        sweeper.start()
    return sweeper
