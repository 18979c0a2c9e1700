"""The deadline sweeper, driven by a fake loop whose clock and timers the test advances.

Coarse items fire at the first tick past their deadline; precise ones (upstream exchanges,
whose waits the retry time budget clips) fire at their deadline itself, whether it was
armed long before (the tick before it arms a timer) or just before (``fire_at``).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

import pytest

from proxy.dataplane.timers import Sweeper


class FakeLoop:
    def __init__(self) -> None:
        self.now = 100.0
        self._timers: list[tuple[float, int, Any, tuple[Any, ...]]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any, *args: Any) -> Any:
        heapq.heappush(self._timers, (when, next(self._order), callback, args))
        return self

    def cancel(self) -> None:  # the sweeper's own handle, on stop()
        pass

    def advance(self, seconds: float) -> None:
        """Run every timer due within ``seconds``, each at its own time."""
        end = self.now + seconds
        while self._timers and self._timers[0][0] <= end:
            when, _, callback, args = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            callback(*args)
        self.now = end


class Item:
    def __init__(self, loop: FakeLoop) -> None:
        self.loop = loop
        self.deadline = 0.0
        self.fired_at: list[float] = []

    def on_deadline(self) -> None:
        self.fired_at.append(self.loop.now)


def started(tick: float = 0.05) -> tuple[FakeLoop, Sweeper]:
    loop = FakeLoop()
    sweeper = Sweeper(loop, tick=tick)  # type: ignore[arg-type]
    sweeper.start()
    return loop, sweeper


def test_a_coarse_deadline_fires_at_the_tick_after_it():
    loop, sweeper = started()
    item = Item(loop)
    sweeper.watch(item)
    item.deadline = loop.now + 0.12
    loop.advance(1.0)
    assert item.fired_at == [pytest.approx(100.15)]  # ticks at 100.05, 100.10, 100.15
    assert item.deadline == 0.0


def test_a_precise_deadline_fires_at_its_time():
    loop, sweeper = started()
    item = Item(loop)
    sweeper.watch(item, precise=True)
    item.deadline = loop.now + 0.123
    loop.advance(1.0)
    assert item.fired_at == [pytest.approx(100.123)]


def test_a_precise_deadline_armed_inside_the_current_tick_asks_for_its_timer():
    loop, sweeper = started()
    item = Item(loop)
    sweeper.watch(item, precise=True)
    loop.advance(0.051)  # just past a tick: the next one is at 100.10
    item.deadline = loop.now + 0.02
    assert item.deadline < sweeper.next_sweep
    sweeper.fire_at(item, item.deadline)
    loop.advance(1.0)
    assert item.fired_at == [pytest.approx(100.071)]


def test_a_timer_for_a_deadline_moved_or_cleared_meanwhile_does_nothing():
    loop, sweeper = started()
    moved, cleared, gone = Item(loop), Item(loop), Item(loop)
    for item in (moved, cleared, gone):
        sweeper.watch(item, precise=True)
        item.deadline = loop.now + 0.03
        sweeper.fire_at(item, item.deadline)
    moved.deadline = loop.now + 0.5  # data came: the wait starts again
    cleared.deadline = 0.0  # the exchange completed
    sweeper.unwatch(gone)  # the connection closed
    loop.advance(0.2)
    assert (moved.fired_at, cleared.fired_at, gone.fired_at) == ([], [], [])
    loop.advance(1.0)
    assert moved.fired_at == [pytest.approx(100.5)]
