"""The stampede lock: one leader per key, followers woken by a future, timers by hand."""

from __future__ import annotations

import asyncio

import pytest

from proxy.cache.lock import Outcome, StampedeLock


class ManualTimers:
    """call_later by hand: a timer fires only when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, object, list[bool]]] = []

    def __call__(self, delay, callback):
        cancelled = [False]
        self.pending.append((delay, callback, cancelled))

        class Handle:
            def cancel(self_inner) -> None:
                cancelled[0] = True

        return Handle()

    def fire_all(self) -> None:
        for _, callback, cancelled in self.pending:
            if not cancelled[0]:
                callback()


async def test_first_leads_others_follow_and_hear_the_outcome():
    timers = ManualTimers()
    lock = StampedeLock(5.0, schedule=timers)
    assert lock.lead("k")
    assert not lock.lead("k")
    followers = [lock.follow("k") for _ in range(3)]
    assert [delay for delay, _, _ in timers.pending] == [5.0, 5.0, 5.0]
    assert lock.release("k", Outcome.STORED) == 3
    assert [await f for f in followers] == [Outcome.STORED] * 3
    timers.fire_all()  # cancelled: no effect
    assert not lock.leading("k") and lock.lead("k")


async def test_follower_times_out_without_the_leader():
    timers = ManualTimers()
    lock = StampedeLock(1.0, schedule=timers)
    lock.lead("k")
    follower = lock.follow("k")
    await asyncio.sleep(0)
    assert not follower.done()
    timers.fire_all()
    assert await follower is Outcome.TIMED_OUT
    assert lock.release("k", Outcome.NOT_STORED) == 1  # the late release harms nothing


async def test_keys_are_independent():
    lock = StampedeLock(1.0, schedule=ManualTimers())
    assert lock.lead("a") and lock.lead("b")
    follower = lock.follow("a")
    lock.release("b", Outcome.STORED)
    assert not follower.done()
    lock.release("a", Outcome.NOT_STORED)
    assert await follower is Outcome.NOT_STORED
    assert len(lock) == 0


async def test_release_without_a_flight_is_harmless():
    assert StampedeLock(1.0).release("nobody", Outcome.STORED) == 0


async def test_a_cancelled_follower_does_not_break_the_release():
    lock = StampedeLock(1.0, schedule=ManualTimers())
    lock.lead("k")
    gone = lock.follow("k")
    gone.cancel()
    stays = lock.follow("k")
    lock.release("k", Outcome.STORED)
    assert await stays is Outcome.STORED
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_real_timer_by_default():
    lock = StampedeLock(0.0)
    lock.lead("k")
    assert await lock.follow("k") is Outcome.TIMED_OUT
