"""MemoryBackend (LRU bound, eviction, lazy sweep) and RateLimiter's fallback and breaker.

Fake clocks throughout, and the Redis probe's wait is stepped by the test (``ProbeWaits``):
nothing sleeps. The Redis failure path uses a RedisBackend pointed at a closed port, or a
scripted stand-in when the breaker's transitions must be exact.
"""

import asyncio
import socket
import time
from dataclasses import dataclass

import pytest

from proxy.config import RedisConfig
from proxy.ratelimit import (
    Decision,
    MemoryBackend,
    RateLimitBackendError,
    RateLimiter,
    RedisBackend,
    RedisBreaker,
    RedisBreakerState,
    compose_key,
    enforced,
)
from tests.support.clock import FakeClock


@dataclass(frozen=True)
class Rule:
    rate: float = 1.0
    burst: int = 2
    on_redis_error: str = "local"
    mode: str = "enforce"


class ProbeWaits:
    """The limiter's ``sleep``: each wait of the probe lasts until the test ends it."""

    def __init__(self) -> None:
        self.intervals: list[float] = []
        self._waiting: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()

    async def __call__(self, seconds: float) -> None:
        self.intervals.append(seconds)
        ended = asyncio.get_running_loop().create_future()
        self._waiting.put_nowait(ended)
        await ended

    async def next(self) -> asyncio.Future[None]:
        """The probe's next wait, once it has begun (a bounded wait for that, no sleep)."""
        return await asyncio.wait_for(self._waiting.get(), 5)

    async def end_next(self) -> None:
        (await self.next()).set_result(None)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- MemoryBackend ------------------------------------------------------------------


def test_memory_bucket_refills_with_the_clock():
    clock = FakeClock()
    memory = MemoryBackend(clock=clock)
    assert [memory.allow_now("k", rate=2.0, burst=2).allowed for _ in range(3)] == [
        True,
        True,
        False,
    ]
    clock.advance(0.5)
    assert memory.allow_now("k", rate=2.0, burst=2).allowed
    assert not memory.allow_now("k", rate=2.0, burst=2).allowed


def test_memory_keys_are_independent():
    memory = MemoryBackend(clock=FakeClock())
    assert memory.allow_now("a", rate=1.0, burst=1).allowed
    assert not memory.allow_now("a", rate=1.0, burst=1).allowed
    assert memory.allow_now("b", rate=1.0, burst=1).allowed


async def test_memory_async_allow_is_the_sync_check():
    memory = MemoryBackend(clock=FakeClock())
    decision = await memory.allow("k", rate=1.0, burst=3, cost=2)
    assert decision == Decision(True, 3, 1, 2.0, 0.0)


def test_memory_is_bounded_and_evicts_the_least_recently_used():
    clock = FakeClock()
    memory = MemoryBackend(max_keys=3, clock=clock)
    for key in ("a", "b", "c"):
        memory.allow_now(key, rate=0.001, burst=1)  # empty for a long time: never swept
    memory.allow_now("a", rate=0.001, burst=1)  # "a" is now the most recently used
    memory.allow_now("d", rate=0.001, burst=1)
    assert len(memory) == 3
    assert "b" not in memory
    assert all(key in memory for key in ("a", "c", "d"))
    # The evicted client starts again with a full bucket.
    assert memory.allow_now("b", rate=0.001, burst=1).allowed
    assert "c" not in memory


def test_memory_sweeps_buckets_that_are_full_again():
    clock = FakeClock()
    memory = MemoryBackend(clock=clock)
    memory.allow_now("a", rate=1.0, burst=1)  # full again after 1 s
    memory.allow_now("b", rate=1.0, burst=1)
    clock.advance(1.0)
    memory.allow_now("c", rate=1.0, burst=1)
    assert "a" not in memory and "b" not in memory
    assert len(memory) == 1


def test_memory_sweep_stops_at_a_bucket_still_refilling():
    clock = FakeClock()
    memory = MemoryBackend(clock=clock)
    memory.allow_now("slow", rate=0.01, burst=1)  # 100 s to refill
    memory.allow_now("fast", rate=1.0, burst=1)
    clock.advance(1.0)
    memory.allow_now("new", rate=1.0, burst=1)
    assert "slow" in memory  # not full: its debt must be remembered
    assert not memory.allow_now("slow", rate=0.01, burst=1).allowed


def test_memory_clock_going_backwards_refills_nothing_twice():
    clock = FakeClock(100.0)
    memory = MemoryBackend(clock=clock)
    memory.allow_now("k", rate=1.0, burst=1)
    clock.now = 50.0  # a step back: no refill, and the later timestamp is kept
    assert not memory.allow_now("k", rate=1.0, burst=1).allowed
    clock.now = 100.5
    assert not memory.allow_now("k", rate=1.0, burst=1).allowed
    clock.now = 101.0
    assert memory.allow_now("k", rate=1.0, burst=1).allowed


# --- RateLimiter without Redis --------------------------------------------------------


async def test_limiter_without_redis_uses_memory_per_route():
    clock = FakeClock()
    limiter = RateLimiter(None, clock=clock)
    rule = Rule(rate=1.0, burst=2)
    results = [(await limiter.check("api", "1.2.3.4", rule)).allowed for _ in range(3)]
    assert results == [True, True, False]
    assert (await limiter.check("web", "1.2.3.4", rule)).allowed  # another route's bucket
    clock.advance(1.0)
    assert (await limiter.check("api", "1.2.3.4", rule)).allowed
    assert not limiter.shared
    await limiter.close()


def test_compose_key_and_enforced():
    assert compose_key("api", "10.0.0.1") == "api:10.0.0.1"
    denied = Decision(False, 1, 0, 1.0, 1.0)
    allowed = Decision(True, 1, 0, 1.0, 0.0)
    assert enforced(denied, Rule(mode="enforce"))
    assert not enforced(denied, Rule(mode="shadow"))
    assert not enforced(allowed, Rule(mode="enforce"))


def test_redis_breaker_transitions():
    clock = FakeClock()
    breaker = RedisBreaker(clock)
    assert breaker.state is RedisBreakerState.CLOSED and breaker.open_for() == 0.0
    assert breaker.trip()
    assert not breaker.trip()  # concurrent failures: already open
    clock.advance(2.5)
    assert breaker.state is RedisBreakerState.OPEN and breaker.open_for() == 2.5
    assert breaker.reset()
    assert not breaker.reset()
    assert breaker.is_closed and breaker.open_for() == 0.0


# --- RateLimiter with a failing Redis -------------------------------------------------


class ScriptedRedis:
    """Stands in for RedisBackend: fails or answers as the test says; counts calls."""

    def __init__(self) -> None:
        self.up = True
        self.allow_calls = 0
        self.pinged = asyncio.Event()
        self.closed = False

    def allow_soon(self, key, rate, burst, cost=1):
        self.allow_calls += 1
        answer = asyncio.get_running_loop().create_future()
        if self.up:
            answer.set_result(Decision(True, burst, burst - cost, cost / rate, 0.0))
        else:
            answer.set_exception(RateLimitBackendError("scripted outage"))
        return answer

    async def allow(self, key, rate, burst, cost=1):
        return await self.allow_soon(key, rate, burst, cost)

    async def ping(self):
        self.pinged.set()
        if not self.up:
            raise RateLimitBackendError("scripted outage")

    async def close(self):
        self.closed = True


async def test_breaker_skips_redis_while_open_and_the_probe_closes_it():
    redis = ScriptedRedis()
    errors = []
    waits = ProbeWaits()
    limiter = RateLimiter(redis, clock=FakeClock(), on_backend_error=errors.append,
                          probe_interval=0.5, sleep=waits)  # fmt: skip
    rule = Rule(on_redis_error="allow")
    assert (await limiter.check("api", "k", rule)).backend_failed is False
    redis.up = False
    first = await limiter.check("api", "k", rule)
    assert first.allowed and first.backend_failed
    assert len(errors) == 1 and isinstance(errors[0], RateLimitBackendError)
    assert not limiter.shared
    calls = redis.allow_calls
    for _ in range(5):
        assert (await limiter.check("api", "k", rule)).backend_failed
    assert redis.allow_calls == calls  # open: Redis not called at all
    assert len(errors) == 1
    assert not redis.pinged.is_set()  # the probe waits its interval first
    await waits.end_next()
    await asyncio.wait_for(redis.pinged.wait(), 5)  # the probe runs and fails
    assert not limiter.shared
    redis.up = True
    await waits.end_next()  # the ping after the next wait is answered
    await _yield_until(lambda: limiter.shared)
    assert waits.intervals == [0.5, 0.5]
    assert (await limiter.check("api", "k", rule)).backend_failed is False
    assert redis.allow_calls == calls + 1
    await limiter.close()
    assert redis.closed


async def test_fallback_local_uses_this_instances_share():
    redis = ScriptedRedis()
    redis.up = False
    clock = FakeClock()
    limiter = RateLimiter(redis, instances=3, clock=clock, probe_interval=60)
    rule = Rule(rate=3.0, burst=7, on_redis_error="local")
    decisions = [await limiter.check("api", "k", rule) for _ in range(3)]
    # burst 7 // 3 instances = 2, rate 3/s / 3 = 1/s
    assert [d.allowed for d in decisions] == [True, True, False]
    assert all(d.limit == 2 and not d.backend_failed for d in decisions)
    assert decisions[-1].retry_after == 1.0
    clock.advance(1.0)
    assert (await limiter.check("api", "k", rule)).allowed
    await limiter.close()


async def test_fallback_local_burst_is_at_least_one():
    redis = ScriptedRedis()
    redis.up = False
    limiter = RateLimiter(redis, instances=10, clock=FakeClock(), probe_interval=60)
    decision = await limiter.check("api", "k", Rule(rate=1.0, burst=3))
    assert decision.allowed and decision.limit == 1
    await limiter.close()


async def test_fallback_deny():
    redis = ScriptedRedis()
    redis.up = False
    limiter = RateLimiter(redis, clock=FakeClock(), probe_interval=60)
    decision = await limiter.check("api", "k", Rule(on_redis_error="deny"))
    assert not decision.allowed and decision.backend_failed
    assert enforced(decision, Rule(on_redis_error="deny"))
    await limiter.close()


async def test_refused_connection_falls_back_fast_and_close_stops_the_probe():
    backend = RedisBackend(RedisConfig(url=f"redis://127.0.0.1:{closed_port()}/0", timeout=0.5))
    errors = []
    waits = ProbeWaits()
    limiter = RateLimiter(backend, on_backend_error=errors.append, sleep=waits)
    rule = Rule(rate=1.0, burst=1, on_redis_error="local")
    started = time.monotonic()
    first = await limiter.check("api", "k", rule)
    second = await limiter.check("api", "k", rule)
    assert time.monotonic() - started < 1.0  # refused at once, well under 2 x timeout
    assert first.allowed and not second.allowed  # the local bucket, burst 1
    assert len(errors) == 1
    assert "ConnectionError" in str(errors[0])
    probe = limiter._probe_task
    assert probe is not None and not probe.done()
    for _ in range(3):  # each wait ends, its PING is refused, the probe waits again
        await waits.end_next()
    await waits.next()  # the fourth wait has begun: three PINGs were refused
    assert not limiter.shared and len(waits.intervals) == 4
    await limiter.close()
    assert probe.done() and limiter._probe_task is None


async def test_backend_error_wraps_every_failure():
    backend = RedisBackend(RedisConfig(url=f"redis://127.0.0.1:{closed_port()}/0", timeout=0.5))
    with pytest.raises(RateLimitBackendError):
        await backend.allow("k", 1.0, 1)
    with pytest.raises(RateLimitBackendError):
        await backend.ping()
    await backend.close()


async def _yield_until(condition, rounds: int = 100) -> None:
    """Let the loop run other tasks until ``condition`` holds, without any real wait."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")
