"""The stampede lock (pingora-cache ``lock.rs``): one request upstream per cold key.

The first miss for a key becomes the *leader* and goes upstream; later misses for the same
key *follow*: each awaits a future (no polling) that the leader resolves when its response
is stored or known not to be storable, or that a timer resolves after ``timeout``. A
follower told ``STORED`` looks the key up again; any other outcome sends it upstream
itself. The leader must ``release`` in every case (a ``finally``), or its followers wait
out the timeout.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from typing import Any


class Outcome(enum.Enum):
    STORED = "stored"  # look again: the answer is in the store
    NOT_STORED = "not_stored"  # the leader's answer could not be shared: go yourself
    TIMED_OUT = "timed_out"  # the leader took longer than lock_timeout: go yourself


Schedule = Callable[[float, Callable[[], None]], Any]  # call_later-like: returns a handle


class _Flight:
    __slots__ = ("followers",)

    def __init__(self) -> None:
        self.followers: list[tuple[asyncio.Future[Outcome], Any]] = []


class StampedeLock:
    def __init__(self, timeout: float, schedule: Schedule | None = None) -> None:
        self.timeout = timeout
        self._schedule = schedule
        self._flights: dict[str, _Flight] = {}

    def lead(self, key: str) -> bool:
        """True when the caller is now the leader for ``key``; False when one exists (then
        ``follow``)."""
        if key in self._flights:
            return False
        self._flights[key] = _Flight()
        return True

    def follow(self, key: str) -> asyncio.Future[Outcome]:
        """A future the leader of ``key`` resolves (or the timeout, with TIMED_OUT)."""
        flight = self._flights[key]
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        schedule = self._schedule or asyncio.get_running_loop().call_later
        timer = schedule(self.timeout, lambda: _resolve(future, Outcome.TIMED_OUT))
        flight.followers.append((future, timer))
        return future

    def release(self, key: str, outcome: Outcome) -> int:
        """The leader is done: tell every follower; how many there were."""
        flight = self._flights.pop(key, None)
        if flight is None:
            return 0
        for future, timer in flight.followers:
            timer.cancel()
            _resolve(future, outcome)
        return len(flight.followers)

    def leading(self, key: str) -> bool:
        return key in self._flights

    def __len__(self) -> int:
        return len(self._flights)


def _resolve(future: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not future.done():
        future.set_result(outcome)
