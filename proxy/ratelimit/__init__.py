"""Rate limiting: token buckets per route and client key, in memory or shared in Redis.

``bucket`` is the arithmetic, ``memory`` and ``redis`` store buckets behind one
interface (``RateLimitBackend.allow``), ``limiter`` picks the store per route rule and
falls back when Redis fails.
"""

from proxy.ratelimit.bucket import Decision, take
from proxy.ratelimit.limiter import (
    RateLimitBackend,
    RateLimiter,
    RateLimitRule,
    RedisBreaker,
    RedisBreakerState,
    compose_key,
    enforced,
)
from proxy.ratelimit.memory import MemoryBackend
from proxy.ratelimit.redis import RateLimitBackendError, RedisBackend

__all__ = [
    "Decision",
    "MemoryBackend",
    "RateLimitBackend",
    "RateLimitBackendError",
    "RateLimitRule",
    "RateLimiter",
    "RedisBackend",
    "RedisBreaker",
    "RedisBreakerState",
    "compose_key",
    "enforced",
    "take",
]
