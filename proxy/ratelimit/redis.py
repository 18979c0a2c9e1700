"""Token buckets shared through Redis: one atomic Lua script call per check.

Invariants:
- Every check is one EVALSHA of ``token_bucket.lua``; a call answered NOSCRIPT (after a
  restart, a failover to a replica that never ran it, or ``SCRIPT FLUSH``) has the
  script loaded and runs once more. The refill uses Redis's own clock, so all processes
  and hosts share one timeline.
- Keys are ``{prefix}{key}``; the caller composes ``key`` (the limiter uses
  ``{route}:{client key}``), so Redis holds ``sluicegate:rl:{route}:{client key}``. In
  cluster mode the key is a hash tag, ``sluicegate:rl:{{route}:{client key}}``: buckets
  spread over the slots, and each script call touches one.
- A bucket key expires once the bucket would be full again (PEXPIRE, ms, rounded up).
- No caller waits more than ``timeout`` for its check (plus the wait for the batch
  before it, below): a deadline timer per batch fails the checks still unanswered, and
  does not wait for the call to unwind (a cancelled redis-py cluster call was measured
  taking about a second to). Such given-up batches finish or fail in the background,
  bounded by ``unwind_limit`` each; while ``MAX_UNWINDING`` of them are still going, new
  checks fail at once. redis-py's own retries are off. Any failure raises
  ``RateLimitBackendError``. A call that timed out may still have reached Redis and run
  later: its token may be taken even though the caller fell back (at most once per
  abandoned call, never more).
- Checks go out in batches: those of one event-loop tick go together, and while a batch
  is in flight the next checks wait for it and then go together. Each is still its own
  script call, atomic on its own, so the maths is exactly that of one call per check.
  In single and sentinel mode a batch is one pipeline (one write, one pooled connection:
  the client's per-batch cost, most of a check's CPU, is shared); when it fails, the
  checks queued behind it fail with it, so none waits more than about one ``timeout``.
  In cluster mode the calls of a batch run concurrently, each routed to its slot's
  master by ``RedisCluster`` (which refuses pipelined scripts), and each check is
  answered as soon as its own call is: a dead master fails only the checks on its slots.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError, RedisError, ResponseError

from proxy import redisconn
from proxy.config import RedisConfig
from proxy.ratelimit.bucket import Decision

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "sluicegate:rl:"
MAX_BATCH = 256  # checks per batch; more in one tick start another batch
MAX_UNWINDING = 16  # batches given up at their deadline and still running

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
    """Shared token buckets in the Redis that ``config`` names (any mode)."""

    def __init__(
        self,
        config: RedisConfig,
        *,
        prefix: str = DEFAULT_PREFIX,
        unwind_limit: float | None = None,
    ) -> None:
        self.timeout = config.timeout
        self.prefix = prefix
        # A given-up batch still runs; this bounds how long (cluster calls are not
        # cancelled at the deadline, only past this).
        self.unwind_limit = (
            unwind_limit if unwind_limit is not None else max(1.0, 10 * self.timeout)
        )
        # Single and sentinel: whole calls are bounded here (a deadline per batch,
        # asyncio.timeout around pings and pipelines), so redis-py needs no
        # socket_timeout of its own: that would add a timer per read and a task per
        # send, measured at a third of a check's CPU.
        if config.mode == "cluster":
            # Cluster calls are left to finish after their deadline, and RedisCluster
            # refreshes its slot map inside a call (under a lock every call waits on):
            # each read needs its own bound, or one frozen node stalls them all. A
            # batch's calls to one master may all run at once.
            options = {"socket_timeout": self.timeout, "max_connections": 2 * MAX_BATCH}
        else:
            options = {"socket_timeout": None}
        self.redis = redisconn.connect(config, **options)
        self._client = self.redis.client
        self.script_sha = hashlib.sha1(TOKEN_BUCKET_LUA.encode()).hexdigest()
        self._cluster = self.redis.cluster
        self._batch: list[_Check] = []
        self._in_flight: set[asyncio.Task[None]] = set()  # the next batch waits for these
        self._unwinding: set[asyncio.Task[None]] = set()  # given up at their deadline
        self._ping: asyncio.Task[Any] | None = None
        log.info("rate limits are shared through redis (%s)", self.redis.where)

    def bucket_key(self, key: str) -> str:
        """The Redis key of bucket ``key``."""
        return redisconn.hash_tagged(self.prefix, key) if self._cluster else self.prefix + key

    async def allow(self, key: str, rate: float, burst: int, cost: int = 1) -> Decision:
        """Check and update the shared bucket of ``key`` (batched per loop tick)."""
        return await self.allow_soon(key, rate, burst, cost)

    def allow_soon(
        self, key: str, rate: float, burst: int, cost: int = 1
    ) -> asyncio.Future[Decision]:
        """``allow`` as a future: it fails with ``RateLimitBackendError``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decision] = loop.create_future()
        if len(self._unwinding) >= MAX_UNWINDING:
            future.set_exception(
                RateLimitBackendError(
                    f"redis: {len(self._unwinding)} timed-out batches still unwinding"
                )
            )
            return future
        batch = self._batch
        batch.append((self.bucket_key(key), rate, burst, cost, future))
        if len(batch) == 1 and not self._in_flight:
            loop.call_soon(self._send_batch)
        elif len(batch) >= MAX_BATCH:
            self._send_batch()
        # else a batch is in flight: this check goes with the next, sent when it returns.
        # Under load the batches grow, and what a batch costs is shared by more checks.
        return future

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, []
        if not batch:
            return
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._run_batch(batch))
        self._in_flight.add(task)
        deadline = loop.call_later(self.timeout, self._deadline_passed, task, batch)
        task.add_done_callback(lambda done: self._batch_returned(done, deadline))

    def _deadline_passed(self, task: asyncio.Task[None], batch: list[_Check]) -> None:
        if task.done():  # answered, its done callback not run yet
            return
        # The callers stop waiting now, whatever the call is doing; it finishes or fails
        # in the background (a pipeline's own timeout cancels it about now).
        error = RateLimitBackendError(_describe(TimeoutError(), self.timeout))
        waiting, self._batch = self._batch, []
        _fail(batch + waiting, error)
        self._in_flight.discard(task)
        self._unwinding.add(task)

    def _batch_returned(self, task: asyncio.Task[None], deadline: asyncio.TimerHandle) -> None:
        deadline.cancel()
        self._in_flight.discard(task)
        self._unwinding.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a bug: never lose it
            log.error("rate limit batch failed", exc_info=task.exception())
        if self._batch and not self._in_flight:
            self._send_batch()

    async def _run_batch(self, batch: list[_Check]) -> None:
        try:
            if self._cluster:
                async with asyncio.timeout(self.unwind_limit):
                    await asyncio.gather(*[self._call(*check) for check in batch])
                return
            async with asyncio.timeout(self.timeout):
                replies = await self._pipeline(batch)
                missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
                if missing:
                    # Only the calls that did not run go again: the others took their token.
                    await self._client.script_load(TOKEN_BUCKET_LUA)
                    again = await self._pipeline([batch[i] for i in missing])
                    for i, reply in zip(missing, again, strict=True):
                        replies[i] = reply
        except Exception as exc:  # whatever went wrong, no caller may be left waiting
            error = RateLimitBackendError(_describe(exc, self.timeout))
            waiting: list[_Check] = []
            if asyncio.current_task() in self._in_flight:
                # The checks queued behind this batch have waited as long as it did: they
                # fail with it (to the route's fallback) rather than wait another timeout.
                # (A batch given up at its deadline failed its queue then; the checks
                # queued since have nothing to do with it.)
                waiting, self._batch = self._batch, []
            _fail(batch + waiting, error)
            return
        for (_, _, burst, _, future), reply in zip(batch, replies, strict=True):
            _answer(future, reply, burst)

    async def _call(self, key: str, rate: float, burst: int, cost: int, future: _Future) -> None:
        """One check as its own script call (cluster mode), answered when it returns."""
        args = (key, repr(float(rate)), burst, cost)
        try:
            try:
                reply = await self._client.evalsha(self.script_sha, 1, *args)
            except NoScriptError:
                # This master never ran the script (a promoted replica, a new node): EVAL
                # runs it and caches it there, in the one call.
                reply = await self._client.eval(TOKEN_BUCKET_LUA, 1, *args)
        except Exception as exc:
            if not future.done():
                future.set_exception(RateLimitBackendError(_describe(exc, self.timeout)))
            return
        _answer(future, reply, burst)

    async def _pipeline(self, batch: list[_Check]) -> list:
        """Every call of the batch in one write, their replies read in order.

        redis-py's Pipeline object builds and parses each command through several Python
        layers; the calls here have one fixed shape, so they are packed as RESP directly
        and sent on a pooled connection through its public send/read methods. In sentinel
        mode the pool connects to whichever node the sentinels name as master.
        """
        sha = self.script_sha.encode()
        payload = b"".join(
            [
                _pack_evalsha(sha, key.encode(), rate, burst, cost)
                for key, rate, burst, cost, _ in batch
            ]
        )
        pool = self._client.connection_pool
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(payload, check_health=False)
            replies: list = []
            for _ in batch:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:  # NOSCRIPT and other error replies
                    replies.append(exc)
        except BaseException:
            # Cut short (timeout, cancellation, reset): the replies still owed on this
            # connection would answer someone else's calls. Never reuse it.
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)
        return replies

    async def ping(self) -> None:
        """Raise ``RateLimitBackendError`` unless Redis answers PING within ``timeout``
        (in cluster mode: every master, so shared limiting resumes once every slot is
        served again).

        A ping that times out is left to finish in the background rather than waited
        for, and the next ping waits on it instead of starting another: one at a time.
        """
        if self._ping is None or self._ping.done():
            self._ping = asyncio.get_running_loop().create_task(self._bounded_ping())
            self._ping.add_done_callback(_retrieve)
        ping = self._ping
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.shield(ping)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RateLimitBackendError(_describe(exc, self.timeout)) from exc

    async def _bounded_ping(self) -> None:
        async with asyncio.timeout(self.unwind_limit):
            await self.redis.ping()

    async def close(self) -> None:
        """Stop what is still running and close the client, its pools and connections."""
        tasks = [*self._in_flight, *self._unwinding]
        if self._ping is not None:
            tasks.append(self._ping)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _fail(self._batch, RateLimitBackendError("redis: the limiter was closed"))
        self._batch = []
        await self.redis.aclose()


_Future = asyncio.Future[Decision]
_Check = tuple[str, float, int, int, _Future]


def _answer(future: _Future, reply: Any, burst: int) -> None:
    if future.done():  # given up at its deadline, or the caller was cancelled
        return
    if isinstance(reply, Exception):
        future.set_exception(RateLimitBackendError(f"redis: {reply}"))
        return
    try:
        future.set_result(decision_from_reply(reply, burst))
    except (TypeError, ValueError):
        future.set_exception(RateLimitBackendError(f"unexpected reply from the script: {reply!r}"))


def _fail(checks: list[_Check], error: RateLimitBackendError) -> None:
    for *_, future in checks:
        if not future.done():
            future.set_exception(error)


def _retrieve(task: asyncio.Task[Any]) -> None:
    # A ping nobody waits for any more must not log "exception was never retrieved".
    if not task.cancelled():
        task.exception()


def _pack_evalsha(sha: bytes, key: bytes, rate: float, burst: int, cost: int) -> bytes:
    """``EVALSHA sha 1 key rate burst cost`` as a RESP array (what redis-py would send).

    Only the key changes from call to call: the parts before and after it are packed once
    per script and per rule.
    """
    before = _packed_heads.get(sha)
    if before is None:
        before = _packed_heads[sha] = b"*7\r\n" + _bulk(b"EVALSHA") + _bulk(sha) + _bulk(b"1")
    after = _packed_tails.get((rate, burst, cost))
    if after is None:
        if len(_packed_tails) >= 1024:  # rules come from the config: a bound all the same
            _packed_tails.clear()
        after = _packed_tails[(rate, burst, cost)] = (
            _bulk(repr(float(rate)).encode()) + _bulk(b"%d" % burst) + _bulk(b"%d" % cost)
        )
    return b"%b$%d\r\n%b\r\n%b" % (before, len(key), key, after)


_packed_heads: dict[bytes, bytes] = {}
_packed_tails: dict[tuple[float, int, int], bytes] = {}


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(arg), arg)


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"redis did not answer within {timeout * 1000:g}ms"
    return f"redis: {exc.__class__.__name__}: {exc}"
