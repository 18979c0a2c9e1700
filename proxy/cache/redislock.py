"""The stampede lock across instances (``cache.store: redis``).

Within a process, ``lock.StampedeLock`` already lets one request per key go on; this lock
makes that one request wait for another *instance* already fetching the key. The leader
holds ``sluicegate:cache:l:<key>`` (SET NX with a lifetime of ``lock_timeout``, so a
crashed leader frees it) and, when done, deletes it and publishes the key and its outcome
on one channel. Each process listens on that channel with one subscription and resolves
the futures of its waiters: no polling. A waiter registers before it looks at the lock
key, so a release between the two is seen; a lost message costs at most ``timeout``.

Redis failing makes every caller a leader: the cache then works as if unshared.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from proxy.cache.channel import subscription
from proxy.cache.lock import Outcome
from proxy.cache.outage import Outage
from proxy.cache.redisstore import PREFIX, REDIS_FAILURES

log = logging.getLogger("sluicegate")

CHANNEL = PREFIX + "released"
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[1])
  redis.call('publish', ARGV[2], ARGV[3])
  return 1
end
return 0
"""


class RedisLock:
    """``deadline`` bounds each call to Redis in all (the wait for a release is bounded by
    ``timeout``). A cluster client subscribes on the node of the channel's slot; PUBLISH
    reaches every node of a cluster, so the release is heard wherever it was published."""

    def __init__(
        self,
        client: Any,
        timeout: float,
        subscriber: Any = None,
        deadline: float | None = None,
        outage: Outage | None = None,
    ) -> None:
        self.client = client
        self.outage = outage if outage is not None else Outage()
        # The subscription's own client: one without a read timeout (it waits for news).
        self.subscriber = subscriber if subscriber is not None else client
        self.timeout = timeout
        self.deadline = deadline
        self._token = os.urandom(8).hex()
        self._waiters: dict[str, list[asyncio.Future[Outcome]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Future[None] | None = None
        self._release = client.register_script(_RELEASE)

    async def lead(self, key: str) -> bool:
        """True when this process now fetches ``key`` for every instance."""
        if self.outage.skipping():
            return True
        if self._listener is None:
            # Subscribe now, off this request's path: the first follower then finds the
            # subscription ready instead of paying for its connect (and a slot map).
            self._start_listener()
        try:
            async with asyncio.timeout(self.deadline):
                acquired = await self.client.set(
                    PREFIX + "l:" + key, self._token, nx=True, px=max(1, int(self.timeout * 1000))
                )
        except REDIS_FAILURES:
            self.outage.failed()
            return True
        return bool(acquired)

    async def follow(self, key: str) -> Outcome:
        """Until the instance fetching ``key`` is done (or ``timeout``)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        if self.outage.skipping():
            return Outcome.TIMED_OUT
        try:
            try:
                async with asyncio.timeout(self.deadline):
                    await self._listen()
                    self._waiters.setdefault(key, []).append(future)
                    held = await self.client.exists(PREFIX + "l:" + key)
            except Exception:  # Redis failed, or the subscription did: go upstream
                self.outage.failed()
                return Outcome.TIMED_OUT
            if not held:
                return Outcome.STORED  # released meanwhile: look (a miss costs one lookup)
            try:
                return await asyncio.wait_for(asyncio.shield(future), self.timeout)
            except TimeoutError:  # the leader took too long, not Redis: go upstream
                return Outcome.TIMED_OUT
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiters[key]

    async def release(self, key: str, outcome: Outcome) -> None:
        if self.outage.skipping():
            return  # the lock expires by itself; waiters time out
        try:
            async with asyncio.timeout(self.deadline):
                await self._release(
                    keys=[PREFIX + "l:" + key],
                    args=[self._token, CHANNEL, f"{outcome.value} {key}"],
                )
        except REDIS_FAILURES:
            self.outage.failed()  # the lock expires by itself; waiters time out

    def stop(self) -> None:
        """End the subscription (the cache is being closed)."""
        if self._listener is not None:
            self._listener.cancel()

    async def _listen(self) -> None:
        if self._listener is None or self._listener.done():
            self._start_listener()
        await asyncio.shield(self._subscribed)  # type: ignore[arg-type]

    def _start_listener(self) -> None:
        loop = asyncio.get_running_loop()
        self._subscribed = subscribed = loop.create_future()
        # Retrieved here so that a failure nobody awaited is not reported as lost.
        subscribed.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._listener = loop.create_task(self._run())

    async def _run(self) -> None:
        subscribed = self._subscribed
        try:
            async with subscription(self.subscriber, CHANNEL) as payloads:
                if subscribed is not None and not subscribed.done():
                    subscribed.set_result(None)
                async for payload in payloads:
                    word, _, key = payload.decode("latin-1").partition(" ")
                    for future in self._waiters.get(key, ()):
                        if not future.done():
                            future.set_result(Outcome(word))
        except Exception as error:  # whatever the client raises: waiters go upstream
            if subscribed is not None and not subscribed.done():
                subscribed.set_exception(error)
            log.warning("cache lock subscription failed: %s", error, extra={"event": "cache"})
            # Nobody will hear their release now: let them go upstream instead of waiting.
            for futures in self._waiters.values():
                for future in futures:
                    if not future.done():
                        future.set_result(Outcome.TIMED_OUT)
