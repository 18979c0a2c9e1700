"""The event-loop lag sampler with an injected clock and a loop whose timers fire by hand."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.observability.looplag import LoopLagSampler
from tests.support.clock import FakeClock


class FakeTimer:
    def __init__(self, delay: float, callback: Any) -> None:
        self.delay = delay
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    def __init__(self) -> None:
        self.timers: list[FakeTimer] = []

    def call_later(self, delay: float, callback: Any) -> FakeTimer:
        timer = FakeTimer(delay, callback)
        self.timers.append(timer)
        return timer

    def fire(self) -> None:
        """Run the one pending timer, as the loop would."""
        pending = [t for t in self.timers if not t.cancelled]
        assert len(pending) == 1, "exactly one timer per process"
        self.timers.remove(pending[0])
        pending[0].callback()


def test_lag_is_how_late_the_timer_ran():
    clock, loop, seen = FakeClock(), FakeLoop(), []
    sampler = LoopLagSampler(seen.append, interval=0.25, clock=clock)
    sampler.start(loop)  # type: ignore[arg-type]
    assert [t.delay for t in loop.timers] == [0.25]

    clock.advance(0.25)  # on time
    loop.fire()
    clock.advance(0.25 + 0.8)  # a callback held the loop for 0.8 s
    loop.fire()
    clock.advance(0.25 + 0.003)
    loop.fire()
    assert seen == pytest.approx([0.0, 0.8, 0.003])


def test_lag_counts_from_when_the_timer_was_armed_not_from_the_last_due_time():
    clock, loop, seen = FakeClock(), FakeLoop(), []
    sampler = LoopLagSampler(seen.append, interval=0.25, clock=clock)
    sampler.start(loop)  # type: ignore[arg-type]
    clock.advance(2.25)  # 2 s late once ...
    loop.fire()
    clock.advance(0.25)  # ... is not late again next time
    loop.fire()
    assert seen == pytest.approx([2.0, 0.0])


def test_a_timer_run_early_by_our_clock_is_no_lag():
    clock, loop, seen = FakeClock(), FakeLoop(), []
    LoopLagSampler(seen.append, interval=0.25, clock=clock).start(loop)  # type: ignore[arg-type]
    clock.advance(0.2499)  # the loop rounds its timers to its own ticks
    loop.fire()
    assert seen == [0.0]


def test_stop_cancels_the_timer():
    clock, loop, seen = FakeClock(), FakeLoop(), []
    sampler = LoopLagSampler(seen.append, interval=0.25, clock=clock)
    sampler.start(loop)  # type: ignore[arg-type]
    sampler.stop()
    assert all(t.cancelled for t in loop.timers)
