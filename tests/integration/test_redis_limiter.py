"""RateLimiter against a real redis-server: shared buckets, expiry, outages, slowness.

Time here is real (Redis's clock decides refills), so every wait is bounded and the
asserts leave room for scheduling: counts are exact only where no whole token can refill.
"""

import asyncio
import contextlib
import time
from dataclasses import dataclass

import pytest
import redis.asyncio

from proxy.config import RedisConfig
from proxy.ratelimit import RateLimiter, RedisBackend
from proxy.ratelimit.redis import DEFAULT_PREFIX, TOKEN_BUCKET_LUA

# A rate so slow that no whole token refills while a test runs.
FROZEN = 0.001


@dataclass(frozen=True)
class Rule:
    rate: float = FROZEN
    burst: int = 5
    on_redis_error: str = "local"
    mode: str = "enforce"


@pytest.fixture
async def make_limiter():
    """Builds limiters, each with its own client and pool (as separate processes have)."""
    limiters = []

    def make(url: str, *, timeout: float = 0.2, instances: int = 1, errors=None):
        limiter = RateLimiter(
            RedisBackend(RedisConfig(url=url, timeout=timeout)),
            instances=instances,
            on_backend_error=None if errors is None else errors.append,
            probe_interval=0.05,
        )
        limiters.append(limiter)
        return limiter

    yield make
    for limiter in limiters:
        await limiter.close()


async def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def stalled(redis_server, seconds: float):
    """Redis busy for ``seconds`` (DEBUG SLEEP from another client) inside the block."""
    other = redis.asyncio.from_url(redis_server.url)
    sleeper = asyncio.create_task(other.execute_command("DEBUG", "SLEEP", str(seconds)))
    try:
        await asyncio.sleep(0.03)  # let the DEBUG SLEEP reach the server first
        yield
    finally:
        await sleeper
        await other.aclose()


async def timed_check(limiter, route, key, rule):
    started = time.monotonic()
    decision = await limiter.check(route, key, rule)
    return decision, time.monotonic() - started


async def test_two_instances_share_one_bucket_exactly(redis_server, make_limiter):
    first, second = make_limiter(redis_server.url), make_limiter(redis_server.url)
    rule = Rule(burst=10)
    decisions = []
    for i in range(30):
        limiter = first if i % 2 == 0 else second
        decisions.append(await limiter.check("api", "10.0.0.1", rule))
    assert sum(d.allowed for d in decisions) == 10
    assert [d.remaining for d in decisions[:10]] == list(range(9, -1, -1))
    assert all(not d.allowed and d.retry_after > 0 for d in decisions[10:])
    assert all(d.limit == 10 and not d.backend_failed for d in decisions)


async def test_shared_refill_is_counted_once_not_per_instance(redis_server, make_limiter):
    first, second = make_limiter(redis_server.url), make_limiter(redis_server.url)
    rule = Rule(rate=50.0, burst=5)
    admitted = 0
    started = last_sent = time.monotonic()
    while time.monotonic() - started < 0.5:
        last_sent = time.monotonic()
        results = await asyncio.gather(
            first.check("api", "k", rule), second.check("api", "k", rule)
        )
        admitted += sum(d.allowed for d in results)
        await asyncio.sleep(0.002)
    elapsed = time.monotonic() - started
    # One bucket: about burst + rate x elapsed, where two separate buckets would double it.
    # Tokens that refill after the last check was sent cannot be taken (a loaded machine
    # can stretch that last round trip), so the lower bound counts up to that moment.
    assert rule.burst + rule.rate * (last_sent - started) - 4 <= admitted
    assert admitted <= rule.burst + rule.rate * elapsed + 1


async def test_keys_and_routes_are_independent(redis_server, make_limiter):
    limiter = make_limiter(redis_server.url)
    rule = Rule(burst=1)
    assert (await limiter.check("api", "a", rule)).allowed
    assert not (await limiter.check("api", "a", rule)).allowed
    assert (await limiter.check("api", "b", rule)).allowed
    assert (await limiter.check("web", "a", rule)).allowed
    keys = sorted(redis_server.client().keys("*"))
    assert keys == [f"{DEFAULT_PREFIX}api:a", f"{DEFAULT_PREFIX}api:b", f"{DEFAULT_PREFIX}web:a"]


async def test_bucket_key_has_a_ttl_and_expires_once_full(redis_server, make_limiter):
    limiter = make_limiter(redis_server.url)
    rule = Rule(rate=10.0, burst=5)
    await limiter.check("api", "k", rule)
    client = redis_server.client()
    key = f"{DEFAULT_PREFIX}api:k"
    assert client.hget(key, "tokens") == "4"
    assert 0 < client.pttl(key) <= 100  # one token at 10/s
    for _ in range(4):
        await limiter.check("api", "k", rule)
    assert 0 < client.pttl(key) <= 500  # five tokens at 10/s
    await wait_until(lambda: client.exists(key) == 0, timeout=3)
    # Expired means full: the whole burst is there again.
    results = [(await limiter.check("api", "k", rule)).allowed for _ in range(6)]
    assert results == [True] * 5 + [False]


async def test_noscript_fallback_after_script_flush(redis_server, make_limiter):
    limiter = make_limiter(redis_server.url)
    rule = Rule(burst=5)
    assert (await limiter.check("api", "k", rule)).remaining == 4
    client = redis_server.client()
    client.script_flush()
    decision = await limiter.check("api", "k", rule)
    assert decision.allowed and decision.remaining == 3 and not decision.backend_failed
    assert client.script_exists(limiter._redis.script_sha) == [True]
    assert TOKEN_BUCKET_LUA  # shipped next to the module and loaded


@pytest.mark.parametrize("on_redis_error", ["local", "allow", "deny"])
async def test_redis_killed_then_restarted(redis_server, make_limiter, on_redis_error):
    timeout = 0.2
    errors = []
    limiter = make_limiter(redis_server.url, timeout=timeout, instances=2, errors=errors)
    rule = Rule(burst=4, on_redis_error=on_redis_error)
    assert (await limiter.check("api", "k", rule)).remaining == 3
    assert limiter.shared

    redis_server.stop()
    decisions = []
    for _ in range(4):
        decision, took = await timed_check(limiter, "api", "k", rule)
        assert took < 2 * timeout
        decisions.append(decision)
    assert len(errors) == 1  # only the first check reached the dead Redis
    assert not limiter.shared
    if on_redis_error == "local":
        # This instance's share of the bucket: burst 4 / 2 instances.
        assert [d.allowed for d in decisions] == [True, True, False, False]
        assert not any(d.backend_failed for d in decisions)
    else:
        assert all(d.backend_failed for d in decisions)
        assert all(d.allowed == (on_redis_error == "allow") for d in decisions)

    redis_server.start()
    await wait_until(lambda: limiter.shared)
    decision = await limiter.check("api", "k", rule)
    # The restarted Redis is empty: a fresh shared bucket, not the local one.
    assert decision.allowed and decision.remaining == 3 and decision.limit == 4
    assert redis_server.client().exists(f"{DEFAULT_PREFIX}api:k") == 1


async def test_slow_redis_does_not_stall_the_check(redis_server, make_limiter):
    timeout = 0.05
    errors = []
    limiter = make_limiter(redis_server.url, timeout=timeout, errors=errors)
    rule = Rule(burst=5, on_redis_error="allow")
    assert not (await limiter.check("api", "k", rule)).backend_failed

    async with stalled(redis_server, 0.3):
        decision, took = await timed_check(limiter, "api", "k", rule)
        assert decision.allowed and decision.backend_failed
        # Bounded by the timeout (with room for scheduling), well before Redis wakes up.
        assert took < 3 * timeout
        assert len(errors) == 1 and "did not answer" in str(errors[0])
    await wait_until(lambda: limiter.shared)
    decision = await limiter.check("api", "k", rule)
    # The timed-out call was already on the wire: Redis may run it once it wakes up, so the
    # abandoned request may have taken its token too.
    assert not decision.backend_failed and decision.remaining in (2, 3)


async def test_checks_queued_behind_a_stalled_batch_fail_with_it(redis_server, make_limiter):
    """While a batch is in flight the next checks wait for it, to go out together. If it
    times out, they fall back with it instead of waiting a timeout of their own."""
    timeout = 0.2
    limiter = make_limiter(redis_server.url, timeout=timeout)
    rule = Rule(burst=5, on_redis_error="allow")
    assert not (await limiter.check("api", "k", rule)).backend_failed

    async with stalled(redis_server, 0.6):
        first = asyncio.create_task(timed_check(limiter, "api", "k", rule))
        await asyncio.sleep(timeout / 2)  # the first batch is on the wire, stalled
        queued, took = await timed_check(limiter, "api", "other", rule)
        assert queued.allowed and queued.backend_failed
        assert took < timeout  # about timeout / 2: it never waited a timeout of its own
        first_decision, _ = await first
        assert first_decision.backend_failed
