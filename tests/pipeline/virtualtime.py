"""An asyncio event loop whose clock is virtual and jumps ahead whenever the loop is idle.

Trio's autojump clock, for asyncio: the loop's ``time()`` is a number the loop itself
moves. When no callback is ready and no I/O is pending, the selector would have slept until
the next timer; instead the clock jumps to that timer at once. A test that waits for a 30 s
read timeout therefore takes as long as the callbacks that run meanwhile (the 50 ms sweeper
ticks among them), and every deadline fires in the order and at the instant it would have
with a real clock. Everything that reads ``loop.time()`` is on this clock: the sweeper, the
upstream read deadlines, ``asyncio.sleep``/``asyncio.timeout``, and whatever the test hands
``loop.time`` as its clock.

Real I/O still works (the loop's self-pipe, a socket a test might open): the selector
polls it without blocking before each jump, so a ready descriptor is served before time
moves on.
"""

from __future__ import annotations

import asyncio
import math
import selectors
from typing import Any

START = 1000.0  # not 0: the data plane reads a deadline of 0 as "none"
# A test waiting on something that never comes would otherwise spin through virtual time
# until the real-time pytest timeout; a day of virtual time is far past any deadline here.
VIRTUAL_LIMIT = 24 * 3600.0
# Nothing scheduled and nothing ready: only real I/O (a thread, a real socket) could wake
# the loop. Wait for it this long in real time before calling the test stuck.
REAL_IDLE_LIMIT = 5.0
# Timers are moved onto a binary grid (later, never earlier, by under a microsecond): sums
# and differences of grid instants are exact, so "one second after" is exactly 1.0 later,
# as a test of a token bucket or a deadline expects, with no float residue either way.
GRID = 2.0**-20


class StuckTest(RuntimeError):
    """The loop had nothing left to run: the test awaits what can never happen."""


class _AutojumpSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._virtual_loop = loop

    def select(self, timeout: float | None = None) -> list:
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            events = super().select(self._virtual_loop.real_idle_limit)
            if not events:
                raise StuckTest("the event loop is idle with no timer scheduled")
            return events
        self._virtual_loop.jump_to_next_timer(timeout)
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """``time()`` starts at ``START`` and moves only when the loop is idle (by as much as
    the next timer needs) or when a test calls ``advance``."""

    def __init__(self) -> None:
        self._now = START
        self.real_idle_limit = REAL_IDLE_LIMIT
        super().__init__(_AutojumpSelector(self))
        self._clock_resolution = 1e-9  # timers due within this of now are run now

    def time(self) -> float:
        return self._now

    def elapsed(self) -> float:
        """Virtual seconds since the loop was made."""
        return self._now - START

    def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> Any:
        return super().call_at(math.ceil(when / GRID) * GRID, callback, *args, context=context)

    def jump_to_next_timer(self, timeout: float) -> None:
        """Idle: time moves to the earliest timer, which the loop then runs. ``timeout``
        is what the loop computed for the selector: that timer's ``when`` less ``time()``,
        both on the grid, so the sum lands on the timer exactly."""
        self._now += timeout
        self._check_limit()

    def advance(self, seconds: float) -> None:
        """Move the clock by hand; timers now due run at the loop's next iteration."""
        self._now = math.ceil((self._now + seconds) / GRID) * GRID
        self._check_limit()

    def _check_limit(self) -> None:
        if self._now - START > VIRTUAL_LIMIT:
            raise StuckTest(f"virtual time passed {VIRTUAL_LIMIT:.0f} s: the test never ends")
