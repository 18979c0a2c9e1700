"""A steady stream of rate-limit checks across a Redis failover, each one timed.

Used by the failover tests and by ``loadtests/redis_failover.py`` (which prints the
figures): ``limiter_failover`` drives real ``RateLimiter`` objects against a real
Sentinel set or Cluster, kills a master in the middle of the stream, waits for the
promotion and for the limiters to share their buckets again, and reports the longest
wait for a check and how many requests were admitted beyond the shared limit.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.ratelimit import RateLimiter


@dataclass(frozen=True)
class Rule:
    """A route's ``rate_limit`` as the limiter reads it."""

    rate: float = 20.0
    burst: int = 20
    on_redis_error: str = "local"
    mode: str = "enforce"


@dataclass
class Sample:
    started: float  # time.monotonic() when the check began
    waited: float  # seconds until the limiter answered
    allowed: bool
    backend_failed: bool


@dataclass
class FailoverReport:
    samples: list[Sample] = field(default_factory=list)
    killed_at: float = 0.0
    promoted_after: float = 0.0  # seconds from the kill to the promotion being visible
    shared_after: float = 0.0  # seconds from the kill to every limiter using Redis again
    rule: Rule = field(default_factory=Rule)
    longest_stall: float = 0.0  # the event loop's longest late wake-up during the stream

    @property
    def longest_wait(self) -> float:
        return max(sample.waited for sample in self.samples)

    @property
    def admitted(self) -> int:
        return sum(sample.allowed for sample in self.samples)

    @property
    def window(self) -> float:
        return self.samples[-1].started - self.samples[0].started

    @property
    def limit(self) -> int:
        """What one shared bucket admits over the stream: the burst, then the refill."""
        return self.rule.burst + math.floor(self.rule.rate * self.window)

    @property
    def over_admitted(self) -> int:
        return self.admitted - self.limit

    def summary(self) -> str:
        return (
            f"{len(self.samples)} checks over {self.window:.1f}s; promoted "
            f"{self.promoted_after:.1f}s after the kill, shared again after "
            f"{self.shared_after:.1f}s; longest limiter wait {self.longest_wait * 1000:.0f}ms; "
            f"admitted {self.admitted} for a limit of {self.limit} "
            f"(over-admission {self.over_admitted}); longest event-loop stall "
            f"{self.longest_stall * 1000:.0f}ms"
        )


async def check_stream(
    limiters: list[RateLimiter],
    rule: Rule,
    key: str,
    stop: asyncio.Event,
    *,
    interval: float = 0.005,
) -> list[Sample]:
    """Start one check every ``interval`` (limiters in turn), not waiting for the ones
    before, until ``stop`` is set; every check is awaited and timed."""
    samples: list[Sample] = []

    async def one(limiter: RateLimiter) -> None:
        started = time.monotonic()
        decision = await limiter.check("api", key, rule)
        samples.append(
            Sample(started, time.monotonic() - started, decision.allowed, decision.backend_failed)
        )

    # Only the checks still waiting are kept: gathering every task of the stream at the
    # end would stall the loop, and the checks then in flight would seem slow.
    pending: set[asyncio.Task[None]] = set()
    failed: list[BaseException] = []

    def finished(task: asyncio.Task[None]) -> None:
        pending.discard(task)
        if task.cancelled() or task.exception() is not None:
            failed.append(task.exception() or asyncio.CancelledError())

    turn = 0
    while not stop.is_set():
        task = asyncio.create_task(one(limiters[turn % len(limiters)]))
        pending.add(task)
        task.add_done_callback(finished)
        turn += 1
        await asyncio.sleep(interval)
    await asyncio.gather(*pending, return_exceptions=True)
    if failed:  # every check must be answered
        raise failed[0]
    samples.sort(key=lambda sample: sample.started)
    return samples


async def limiter_failover(
    limiters: list[RateLimiter],
    kill: Callable[[], Any],
    wait_promoted: Callable[[Any], Any],
    *,
    rule: Rule,
    key: str,
    before: float = 1.0,
    after: float = 1.0,
    shared_timeout: float = 20.0,
) -> FailoverReport:
    """Stream checks; ``before`` seconds in, ``kill()`` a master and ``wait_promoted``
    (given what ``kill`` returned); then wait until every limiter uses Redis again and
    stream ``after`` seconds more."""
    report = FailoverReport(rule=rule)
    stop = asyncio.Event()
    stream = asyncio.create_task(check_stream(limiters, rule, key, stop))
    watch = asyncio.create_task(_watch_stalls(report, stop))
    try:
        await asyncio.sleep(before)
        report.killed_at = time.monotonic()
        killed = await asyncio.to_thread(kill)
        await asyncio.to_thread(wait_promoted, killed)
        report.promoted_after = time.monotonic() - report.killed_at
        deadline = time.monotonic() + shared_timeout
        while not all(limiter.shared for limiter in limiters):
            if time.monotonic() > deadline:
                raise AssertionError("the limiters did not use Redis again after the failover")
            await asyncio.sleep(0.01)
        report.shared_after = time.monotonic() - report.killed_at
        await asyncio.sleep(after)
    finally:
        stop.set()
        report.samples = await stream
        await watch
    return report


async def _watch_stalls(report: FailoverReport, stop: asyncio.Event) -> None:
    """How late the loop wakes a 1 ms sleeper: a stall delays every check alike."""
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(0.001)
        report.longest_stall = max(report.longest_stall, time.monotonic() - before - 0.001)
