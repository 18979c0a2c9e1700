"""Event-loop lag: how late the loop runs a timer it scheduled, a saturation signal.

One timer per process, re-armed each time it fires: the lag is the time between when it
was due and when it ran, which is how long every ready callback (a request, a response
chunk) also waited. CPU usage cannot show this on a one-core-per-process proxy; the lag
can, and an autoscaler reads its p99 (``sluicegate_event_loop_lag_seconds``). Nothing is
done per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

SAMPLE_SECONDS = 0.25


class LoopLagSampler:
    """Calls ``observe(seconds_late)`` every ``interval`` from a timer on the loop.

    ``clock`` defaults to the loop's own (``loop.time``): the one its timers are scheduled
    by. uvloop caches it per loop iteration, so another clock would disagree with when the
    loop meant the timer to run by as long as the iteration that armed it had run.
    """

    def __init__(
        self,
        observe: Callable[[float], None],
        *,
        interval: float = SAMPLE_SECONDS,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._observe = observe
        self._interval = interval
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if self._clock is None:
            self._clock = loop.time
        self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self) -> None:
        assert self._loop is not None and self._clock is not None
        self._due = self._clock() + self._interval
        self._handle = self._loop.call_later(self._interval, self._fire)

    def _fire(self) -> None:
        # A loop may run a timer a hair early (uvloop rounds to milliseconds).
        self._observe(max(0.0, self._clock() - self._due))  # type: ignore[misc]
        self._arm()
