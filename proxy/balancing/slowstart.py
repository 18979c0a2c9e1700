"""Slow start: a server that joins ramps from 10% to its full weight, linearly.

A server joins when a reload adds it, DNS discovery finds its address, its health check
turns it up again, its breaker closes, or it is undrained. Servers present when the daemon
starts (and the addresses of the first DNS lookup) start at full weight: there is nothing
to protect them from yet, all of them start cold together.

One ``SlowStart`` per upstream is shared by its servers (which start ramps) and its
policies (which ask whether any ramp is running). ``ramping()`` is the whole cost on the
hot path when no ramp runs: one attribute read. While a ramp runs, policies read
``server.effective_weight(now)`` for every candidate (see ``proxy.balancing.policies``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: The share of its weight a server starts its ramp with (as Envoy's `min_weight_percent`).
START_FRACTION = 0.1


class SlowStart:
    __slots__ = ("_active_until", "clock", "duration")

    def __init__(self, duration: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.duration = duration  # seconds; 0 turns slow start off
        self.clock = clock
        self._active_until = 0.0  # the end of the last ramp begun; 0.0 when none runs

    def begin(self, server: Any) -> None:
        """Start ``server``'s ramp now (a no-op when slow start is off)."""
        if self.duration <= 0:
            return
        now = self.clock()
        server.ramp_started = now
        server.ramp_ends = now + self.duration
        self._active_until = max(self._active_until, server.ramp_ends)

    def ramping(self) -> float | None:
        """The time now when some ramp runs, else None (and then no clock is read)."""
        until = self._active_until
        if not until:
            return None
        now = self.clock()
        if now >= until:
            self._active_until = 0.0
            return None
        return now


def ramped_weight(weight: int, started: float, ends: float, now: float) -> float:
    """``weight`` scaled by the ramp's progress at ``now``: 10% at its start, 100% at its end."""
    if now >= ends:
        return float(weight)
    progress = max(0.0, (now - started) / (ends - started))
    return weight * (START_FRACTION + (1.0 - START_FRACTION) * progress)
