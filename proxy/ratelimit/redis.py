"""Token buckets shared through Redis: one atomic Lua script call per check.

Invariants:
- Every check is one EVALSHA of ``token_bucket.lua``; a call answered NOSCRIPT (after a
  restart or ``SCRIPT FLUSH``) loads the script and runs once more. The refill uses
  Redis's own clock, so all processes and hosts share one timeline.
- Keys are ``{prefix}{key}``; the caller composes ``key`` (the limiter uses
  ``{route}:{client key}``), so Redis holds ``sluicegate:rl:{route}:{client key}``.
- A bucket key expires once the bucket would be full again (PEXPIRE, ms, rounded up).
- Every call is bounded by ``timeout`` (``asyncio.timeout`` around the whole call; the
  connect has its own) and redis-py's own retries are off: a dead or slow Redis costs at
  most ``timeout``. Any failure raises ``RateLimitBackendError``. A call that timed out
  may still have reached Redis and run later: its token may be taken even though the
  caller fell back (at most once per abandoned call, never more).
- Checks share pipelines (one round trip, one pooled connection): those of one event-loop
  tick go together, and while a batch is in flight the next checks wait for it and then
  go together. Each is still its own EVALSHA, atomic on its own, so the maths is exactly
  that of one call per check, while the client's per-batch cost (most of a check's CPU)
  is shared. A batch is bounded by ``timeout`` as a whole; the checks queued behind one
  that failed fail with it, so none waits more than about one ``timeout``.
"""

from __future__ import annotations

import asyncio
import math
from importlib import resources

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from proxy.ratelimit.bucket import Decision

DEFAULT_PREFIX = "sluicegate:rl:"
MAX_BATCH = 256  # checks per pipeline; more in one tick start another pipeline

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
            # Every call here runs under one asyncio.timeout(timeout) per batch (and per
            # ping). A socket_timeout would add redis-py's own per read and per write (a
            # timer, and a task for each send): measured at a third of a check's CPU.
            socket_timeout=None,
            socket_connect_timeout=timeout,
            # No retries inside redis-py: the limiter has its own fallback and breaker,
            # and a retry would double the time a dead Redis costs each request.
            retry=Retry(NoBackoff(), 0),
            retry_on_error=[],
        )
        self._script = self._client.register_script(TOKEN_BUCKET_LUA)
        self._batch: list[tuple[str, float, int, int, asyncio.Future[Decision]]] = []
        self._batches: set[asyncio.Task[None]] = set()  # in flight

    async def allow(self, key: str, rate: float, burst: int, cost: int = 1) -> Decision:
        """Check and update the shared bucket ``{prefix}{key}`` (batched per loop tick)."""
        return await self.allow_soon(key, rate, burst, cost)

    def allow_soon(
        self, key: str, rate: float, burst: int, cost: int = 1
    ) -> asyncio.Future[Decision]:
        """``allow`` as a future: it fails with ``RateLimitBackendError``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decision] = loop.create_future()
        batch = self._batch
        batch.append((self.prefix + key, rate, burst, cost, future))
        if len(batch) == 1 and not self._batches:
            loop.call_soon(self._send_batch)
        elif len(batch) >= MAX_BATCH:
            self._send_batch()
        # else a batch is in flight: this check goes with the next, sent when it returns.
        # Under load the batches grow, and what a batch costs is shared by more checks.
        return future

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._batches.add(task)
            task.add_done_callback(self._batch_returned)

    def _batch_returned(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        if self._batch and not self._batches:
            self._send_batch()

    async def _run_batch(
        self, batch: list[tuple[str, float, int, int, asyncio.Future[Decision]]]
    ) -> None:
        try:
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
            # The checks queued behind this batch have waited as long as it did: they fail
            # with it (to the route's fallback) rather than wait another timeout.
            waiting, self._batch = self._batch, []
            for *_, future in batch + waiting:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, _, burst, _, future), reply in zip(batch, replies, strict=True):
            if future.done():  # the caller gave up (cancelled)
                continue
            if isinstance(reply, Exception):
                future.set_exception(RateLimitBackendError(f"redis: {reply}"))
                continue
            try:
                future.set_result(decision_from_reply(reply, burst))
            except (TypeError, ValueError):
                future.set_exception(
                    RateLimitBackendError(f"unexpected reply from the script: {reply!r}")
                )

    async def _pipeline(
        self, batch: list[tuple[str, float, int, int, asyncio.Future[Decision]]]
    ) -> list:
        """Every call of the batch in one write, their replies read in order.

        redis-py's Pipeline object builds and parses each command through several Python
        layers; the calls here have one fixed shape, so they are packed as RESP directly
        and sent on a pooled connection through its public send/read methods.
        """
        sha = self._script.sha.encode()
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
        """Raise ``RateLimitBackendError`` unless Redis answers PING within ``timeout``."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            raise RateLimitBackendError(_describe(exc, self.timeout)) from exc

    async def close(self) -> None:
        """Close the client and disconnect its pool."""
        await self._client.aclose()


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
