"""Sweeper: deadlines fire on the injected clock's time, one sweep at a time."""

from __future__ import annotations

import asyncio

from proxy.dataplane.timers import Sweeper
from tests.support.clock import FakeClock


class Item:
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.fired = 0

    def on_deadline(self) -> None:
        self.fired += 1


async def test_sweep_fires_only_deadlines_past_due_and_clears_them():
    clock = FakeClock(100.0)
    sweeper = Sweeper(asyncio.get_running_loop(), clock=clock)
    assert sweeper.now == 100.0
    due, later, unarmed = Item(101.0), Item(102.0), Item(0.0)
    for item in (due, later, unarmed):
        sweeper.watch(item)
    clock.advance(1.0)
    sweeper.sweep()
    assert (due.fired, later.fired, unarmed.fired) == (1, 0, 0)
    assert due.deadline == 0.0 and sweeper.now == 101.0
    sweeper.unwatch(later)
    clock.advance(5.0)
    sweeper.sweep()
    assert (due.fired, later.fired) == (1, 0)


async def test_refresh_reads_the_clock():
    clock = FakeClock(5.0)
    sweeper = Sweeper(asyncio.get_running_loop(), clock=clock)
    clock.advance(2.5)
    assert sweeper.now == 5.0
    assert sweeper.refresh() == 7.5 == sweeper.now


async def test_the_default_clock_is_the_loops():
    loop = asyncio.get_running_loop()
    sweeper = Sweeper(loop)
    before = loop.time()
    assert before <= sweeper.refresh() <= loop.time()
