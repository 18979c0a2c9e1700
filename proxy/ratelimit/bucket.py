"""Token-bucket arithmetic, pure: no clock, no I/O, no state of its own.

A bucket holds at most ``burst`` tokens and refills continuously at ``rate`` tokens per
second. A request of ``cost`` tokens is admitted when that many are available; it then
takes them. The state of a bucket is two floats, ``(tokens, updated_at)``, kept by the
caller (a dict in memory, a hash in Redis: ``token_bucket.lua`` is this same maths).

Invariants:
- ``0 <= tokens <= burst`` after every ``take``; the stored value is the exact float,
  never rounded, so many small refills add up without drift.
- A bucket that does not exist yet is full: start it with ``tokens=burst, updated_at=now``.
- Time never runs backwards for a bucket: a ``now`` earlier than ``updated_at`` counts as
  no time passed (``elapsed = 0``). The caller then keeps the later timestamp
  (``max(updated_at, now)``) so the same interval is never refilled twice.
- A request costing more than ``burst`` can never be admitted: it is denied with
  ``retry_after = math.inf`` (waiting does not help). The proxy always asks for cost 1
  and config guarantees ``burst >= 1``, so it never sees an infinite value.
"""

from __future__ import annotations

import math

try:
    import cython
except ModuleNotFoundError:  # run as Python where Cython is not installed
    from proxy import cythonshim as cython


# Compiled (proxy/compiled.py), an extension type whose fields are C values: made once per
# rate-limited request, and a frozen Python dataclass pays a setattr call per field.
@cython.dataclasses.dataclass(frozen=True)
@cython.cclass
class Decision:
    """The answer to one rate-limit check.

    ``limit``: the burst of the bucket that decided (RateLimit-Limit).
    ``remaining``: whole tokens left after this request (RateLimit-Remaining).
    ``reset_after``: seconds until the bucket is full again (RateLimit-Reset).
    ``retry_after``: seconds until ``cost`` tokens are available; 0 when allowed,
        ``math.inf`` when ``cost > burst``.
    ``backend_failed``: the shared backend failed and the route's ``on_redis_error``
        (``allow`` or ``deny``) decided without any bucket; the counts are then
        meaningless and callers should not send RateLimit-* headers. A ``deny`` is a 503,
        not a 429.
    """

    allowed: cython.bint
    limit: cython.longlong
    remaining: cython.longlong
    reset_after: cython.double
    retry_after: cython.double
    backend_failed: cython.bint = False


@cython.locals(elapsed=cython.double, available=cython.double, left=cython.double)
def take(
    tokens: float,
    updated_at: float,
    now: float,
    rate: float,
    burst: cython.longlong,
    cost: cython.longlong = 1,
) -> tuple[Decision, float]:
    """Refill the bucket up to ``now`` and try to take ``cost`` tokens from it.

    Returns the decision and the bucket's new token count (store it with
    ``max(updated_at, now)``). A denied request takes nothing.
    """
    if rate <= 0 or burst < 1 or cost < 1:
        raise ValueError(f"need rate > 0, burst >= 1, cost >= 1 (got {rate}, {burst}, {cost})")
    elapsed = max(0.0, now - updated_at)
    available = min(float(burst), tokens + elapsed * rate)
    allowed = cost <= available
    if allowed:
        left = available - cost
        retry_after = 0.0
    else:
        left = available
        retry_after = (cost - available) / rate if cost <= burst else math.inf
    decision = Decision(
        allowed=allowed,
        limit=burst,
        remaining=math.floor(left),
        reset_after=(burst - left) / rate,
        retry_after=retry_after,
    )
    return decision, left
