"""Token buckets shared through Redis: one atomic Lua script call per check.

Invariants:
- Every check is one EVALSHA of ``token_bucket.lua`` (redis-py's ``Script`` loads the
  script again and retries once on NOSCRIPT, e.g. after a restart or ``SCRIPT FLUSH``).
  The refill uses Redis's own clock, so all processes and hosts share one timeline.
- Keys are ``{prefix}{key}``; the caller composes ``key`` (the limiter uses
  ``{route}:{client key}``), so Redis holds ``sluicegate:rl:{route}:{client key}``.
- A bucket key expires once the bucket would be full again (PEXPIRE, ms, rounded up).
- Every call is bounded by ``timeout`` (``asyncio.timeout`` around the whole call, plus
  socket timeouts on the connection) and redis-py's own retries are off: a dead or slow
  Redis costs at most ``timeout``. Any failure raises ``RateLimitBackendError``. A call
  that timed out may still have reached Redis and run later: its token may be taken even
  though the caller fell back (at most once per abandoned call, never more).
- Later, checks of one event-loop tick can be coalesced into one pipeline: the script can
  run on a pipeline (``self._script(keys, args, client=pipe)``) and each reply is turned
  into a ``Decision`` by ``decision_from_reply`` alone.
"""

from __future__ import annotations

import asyncio
import math
from importlib import resources

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.ratelimit.bucket import Decision

DEFAULT_PREFIX = "sluicegate:rl:"

TOKEN_BUCKET_LUA = (
    resources.files("proxy.ratelimit").joinpath("token_bucket.lua").read_text(encoding="utf-8")
)


class RateLimitBackendError(Exception):
    """The shared rate-limit backend failed or was slower than its timeout."""


def decision_from_reply(reply: list[bytes | str], burst: int) -> Decision:
    """Turn the script's ``[allowed, tokens, reset_after, retry_after]`` into a Decision."""
    allowed, tokens, reset_after, retry_after = reply
    return Decision(
        allowed=int(allowed) == 1,
        limit=burst,
        remaining=math.floor(float(tokens)),
        reset_after=float(reset_after),
        retry_after=float(retry_after),
    )


class RedisBackend:
    """Shared token buckets in Redis, through a pooled redis-py asyncio client."""

    def __init__(self, url: str, timeout: float, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.url = url
        self.timeout = timeout
        self.prefix = prefix
        self._client = redis.asyncio.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # No retries inside redis-py: the limiter has its own fallback and breaker,
            # and a retry would double the time a dead Redis costs each request.
            retry=Retry(NoBackoff(), 0),
            retry_on_error=[],
        )
        self._script = self._client.register_script(TOKEN_BUCKET_LUA)

    async def allow(self, key: str, rate: float, burst: int, cost: int = 1) -> Decision:
        """Check and update the shared bucket ``{prefix}{key}``."""
        try:
            async with asyncio.timeout(self.timeout):
                reply = await self._script(keys=[self.prefix + key], args=[rate, burst, cost])
        except (RedisError, OSError, TimeoutError) as exc:
            raise RateLimitBackendError(_describe(exc, self.timeout)) from exc
        try:
            return decision_from_reply(reply, burst)
        except (TypeError, ValueError) as exc:
            raise RateLimitBackendError(f"unexpected reply from the script: {reply!r}") from exc

    async def ping(self) -> None:
        """Raise ``RateLimitBackendError`` unless Redis answers PING within ``timeout``."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            raise RateLimitBackendError(_describe(exc, self.timeout)) from exc

    async def close(self) -> None:
        """Close the client and disconnect its pool."""
        await self._client.aclose()


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"redis did not answer within {timeout * 1000:g}ms"
    return f"redis: {exc.__class__.__name__}: {exc}"
