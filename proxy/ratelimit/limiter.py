"""The rate limiter a route uses: shared buckets in Redis, a fallback when Redis fails.

States of the breaker around Redis (``RedisBreaker``):

    closed --(a Redis call fails or times out)--> open
    open   --(the background probe's PING is answered)--> closed

- closed: every check is one Redis script call, bounded by ``redis.timeout``.
- open: checks skip Redis entirely and go straight to the route's ``on_redis_error``
  (``local``: an in-process bucket at rate/instances and burst/instances, at least 1;
  ``allow``; ``deny``), so a dead or slow Redis costs one timeout per in-flight request
  when it fails, and nothing afterwards. A probe task (PING every ``probe_interval``,
  started lazily on the first failure, cancelled by ``close()``) closes the breaker again
  and shared limiting resumes by itself.

Without Redis the limiter is the in-process ``MemoryBackend`` alone.

Bucket keys are ``{route}:{client key}`` (``compose_key``); the Redis backend prefixes them
with ``sluicegate:rl:``. Route names are config names; a client key may contain ``:``.
Shadow mode is the caller's business: it counts a denial and lets the request through;
``enforced`` tells when a denial must be answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

from proxy.ratelimit.bucket import Decision
from proxy.ratelimit.memory import MemoryBackend
from proxy.ratelimit.redis import RateLimitBackendError, RedisBackend

log = logging.getLogger(__name__)

DEFAULT_PROBE_INTERVAL = 0.5


class RateLimitBackend(Protocol):
    """What every bucket store offers: check and update one bucket."""

    async def allow(self, key: str, rate: float, burst: int, cost: int = 1) -> Decision: ...


class RateLimitRule(Protocol):
    """The attributes of a route's ``rate_limit`` config the limiter reads."""

    rate: float
    burst: int
    on_redis_error: Literal["local", "allow", "deny"]
    mode: Literal["enforce", "shadow"]


def compose_key(route: str, key: str) -> str:
    """The bucket key of client ``key`` on ``route``: ``{route}:{key}``."""
    return f"{route}:{key}"


def enforced(decision: Decision, rule: RateLimitRule) -> bool:
    """True when the request must be refused: denied, and the rule is not in shadow mode."""
    return not decision.allowed and rule.mode == "enforce"


class RedisBreakerState(enum.Enum):
    CLOSED = "closed"  # Redis is used
    OPEN = "open"  # Redis is skipped until the probe gets an answer


class RedisBreaker:
    """Whether to call Redis at all. Transitions happen in ``_move`` only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.state = RedisBreakerState.CLOSED
        self.opened_at: float | None = None  # clock time of the last closed -> open

    @property
    def is_closed(self) -> bool:
        return self.state is RedisBreakerState.CLOSED

    def open_for(self) -> float:
        """Seconds the breaker has been open (0 while closed)."""
        return 0.0 if self.opened_at is None else self._clock() - self.opened_at

    def trip(self) -> bool:
        """A Redis call failed. Returns True when this opened the breaker."""
        return self._move(RedisBreakerState.OPEN)

    def reset(self) -> bool:
        """Redis answered the probe. Returns True when this closed the breaker."""
        return self._move(RedisBreakerState.CLOSED)

    def _move(self, to: RedisBreakerState) -> bool:
        # Concurrent checks fail together when Redis dies: tripping an open breaker again
        # is expected, not an error, and changes nothing.
        if self.state is to:
            return False
        self.state = to
        self.opened_at = self._clock() if to is RedisBreakerState.OPEN else None
        return True


class RateLimiter:
    """Checks requests against their route's bucket; one per runtime generation."""

    def __init__(
        self,
        redis: RedisBackend | None,
        *,
        instances: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_backend_error: Callable[[Exception], None] | None = None,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
        max_keys: int = 100_000,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if instances < 1:
            raise ValueError(f"instances must be >= 1 (got {instances})")
        self._redis = redis
        self._instances = instances
        self._on_backend_error = on_backend_error
        self._probe_interval = probe_interval
        self._sleep = sleep  # the probe's wait between PINGs: tests step it by hand
        # Without Redis: the buckets. With Redis: only the `local` fallback buckets.
        self._memory = MemoryBackend(max_keys=max_keys, clock=clock)
        self.breaker = RedisBreaker(clock)
        self._probe_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def shared(self) -> bool:
        """True while checks go to Redis (configured, and its breaker closed)."""
        return self._redis is not None and self.breaker.is_closed

    async def check(self, route: str, key: str, rule: RateLimitRule, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from ``key``'s bucket on ``route``; never raises for Redis."""
        pending = self.begin_check(route, key, rule, cost)
        if isinstance(pending, Decision):
            return pending
        try:
            await pending
        except RateLimitBackendError:
            pass  # decided() falls back
        return self.decided(pending, route, key, rule, cost)

    def begin_check(
        self, route: str, key: str, rule: RateLimitRule, cost: int = 1
    ) -> Decision | asyncio.Future[Decision]:
        """``check`` for callers without a coroutine: the Decision when it is known now
        (in-process buckets, a fallback), else a future to hand to ``decided`` once done."""
        bucket_key = compose_key(route, key)
        if self._redis is None:
            return self._memory.allow_now(bucket_key, rule.rate, rule.burst, cost)
        if self.breaker.is_closed:
            return self._redis.allow_soon(bucket_key, rule.rate, rule.burst, cost)
        return self._fallback(bucket_key, rule, cost)

    def decided(
        self,
        pending: asyncio.Future[Decision],
        route: str,
        key: str,
        rule: RateLimitRule,
        cost: int = 1,
    ) -> Decision:
        """The Decision of a finished ``begin_check`` future; the fallback's when Redis
        failed (the same arguments as ``begin_check``)."""
        try:
            return pending.result()
        except RateLimitBackendError as exc:
            self._redis_failed(exc)
        return self._fallback(compose_key(route, key), rule, cost)

    async def close(self) -> None:
        """Stop the probe and release the Redis pool. The limiter is unusable afterwards."""
        self._closed = True
        task, self._probe_task = self._probe_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._redis is not None:
            await self._redis.close()

    def _fallback(self, bucket_key: str, rule: RateLimitRule, cost: int) -> Decision:
        if rule.on_redis_error == "local":
            # Each instance admits its share, so together they stay near the shared limit.
            return self._memory.allow_now(
                bucket_key,
                rule.rate / self._instances,
                max(1, rule.burst // self._instances),
                cost,
            )
        if rule.on_redis_error == "allow":
            return Decision(True, rule.burst, 0, 0.0, 0.0, backend_failed=True)
        if rule.on_redis_error == "deny":
            return Decision(False, rule.burst, 0, 0.0, 0.0, backend_failed=True)
        raise ValueError(f"unknown on_redis_error {rule.on_redis_error!r}")

    def _redis_failed(self, exc: RateLimitBackendError) -> None:
        if self._on_backend_error is not None:
            self._on_backend_error(exc)
        if self.breaker.trip():
            log.warning("rate limiting falls back from redis: %s", exc)
        if self._probe_task is None and not self._closed:
            self._probe_task = asyncio.get_running_loop().create_task(
                self._probe(), name="sluicegate-redis-probe"
            )

    async def _probe(self) -> None:
        assert self._redis is not None
        try:
            while True:
                await self._sleep(self._probe_interval)
                try:
                    await self._redis.ping()
                except RateLimitBackendError:
                    continue
                was_open_for = self.breaker.open_for()
                if self.breaker.reset():
                    log.warning(
                        "redis answers again after %.1fs: shared rate limiting resumes",
                        was_open_for,
                    )
                return
        finally:
            if self._probe_task is asyncio.current_task():
                self._probe_task = None
