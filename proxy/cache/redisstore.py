"""The shared store (``cache.store: redis``): every instance and worker sees one cache.

Layout, under ``sluicegate:cache:``:

- ``r:<primary key>`` a hash: one field per variant (its secondary key), whose value is the
  stored response (``encode``: a 4-byte length, JSON meta, then the body). The hash expires
  when its longest-lived variant can no longer be used, nor revalidated for a day.
- ``u:<url>`` the primary keys stored for a URL (purge by URL; by prefix with SCAN).
- ``t:<tag>`` the variants carrying a tag, as ``primary \\x1f secondary``.

Index sets expire with what they index and may name keys already gone: purges count only
what they really removed. Redis bounds its own memory (``maxmemory`` with an
``allkeys-lru`` or ``allkeys-lfu`` policy); ``max_size`` applies to the memory store.

Every Redis mode (``redisconn``) holds it alike. In a cluster each entry, all its variants
included, is one key, so a call on an entry touches one slot; a store's index updates are
one non-transactional pipeline, which the cluster client splits by node; a purge by
prefix SCANs every master.

A failing or slow Redis never fails a request: a lookup that fails is a miss, a store
that fails stores nothing (and both are logged once a minute at most); after a failure
the request path skips Redis for a moment (``outage``). The size gauges stay the memory
store's: Redis's own figures (INFO, a SCAN of ``r:``) are the shared store's size.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from typing import Any

from redis.exceptions import RedisError

from proxy.cache.outage import Outage
from proxy.cache.policy import Freshness
from proxy.cache.store import StoredResponse, StoreStats

log = logging.getLogger("sluicegate")

PREFIX = "sluicegate:cache:"
REVALIDATION_GRACE = 86400.0  # a validated entry is kept this long past its usefulness
MAX_TTL = 30 * 86400.0
_LENGTH = struct.Struct(">I")
_GLOB_SPECIALS = str.maketrans({c: "\\" + c for c in "*?[]\\"})
ERROR_LOG_INTERVAL = 60.0
REDIS_FAILURES = (RedisError, OSError, TimeoutError)


def encode(response: StoredResponse) -> bytes:
    f = response.freshness
    meta = {
        "u": response.url,
        "v": [list(pair) for pair in response.variance],
        "s": response.status,
        "r": response.reason.decode("latin-1"),
        "h": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in response.headers],
        "f": [
            f.lifetime,
            f.initial_age,
            f.response_time,
            f.must_revalidate,
            f.no_cache,
            f.stale_while_revalidate,
            f.stale_if_error,
        ],
        "t": list(response.tags),
    }
    encoded = json.dumps(meta, separators=(",", ":")).encode()
    return _LENGTH.pack(len(encoded)) + encoded + response.body


def decode(primary: str, blob: bytes) -> StoredResponse:
    (length,) = _LENGTH.unpack_from(blob)
    meta = json.loads(blob[4 : 4 + length])
    return StoredResponse(
        primary=primary,
        url=meta["u"],
        variance=tuple((name, value) for name, value in meta["v"]),
        status=meta["s"],
        reason=meta["r"].encode("latin-1"),
        headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in meta["h"]],
        body=blob[4 + length :],
        freshness=Freshness(*meta["f"]),
        tags=tuple(meta["t"]),
    )


def time_to_live(response: StoredResponse, now: float) -> float:
    """How long Redis keeps it: while it may still answer, stale, or be revalidated."""
    f = response.freshness
    usable = f.lifetime - f.age(now) + max(f.stale_while_revalidate, f.stale_if_error)
    validated = any(name.lower() in (b"etag", b"last-modified") for name, _ in response.headers)
    ttl = max(usable, 0.0) + (REVALIDATION_GRACE if validated else 0.0)
    return min(max(ttl, 1.0), MAX_TTL)


class RedisStore:
    """The store in Redis, any mode (``redisconn``). Each call is one key or a
    non-transactional pipeline, which a cluster client splits by slot; each is bounded by
    ``deadline`` in all (connect, failover lookups, cluster redirections included)."""

    def __init__(
        self,
        client: Any,
        max_object_size: int,
        clock: Any = time.time,
        deadline: float | None = None,
        outage: Outage | None = None,
    ) -> None:
        self.client = client
        # Shared with the lock: one failed call spares the request's other calls.
        self.outage = outage if outage is not None else Outage()
        self.max_object_size = max_object_size
        self.clock = clock
        self.deadline = deadline
        self._last_error_logged = 0.0
        self._version_checked = False

    async def variants(self, primary: str) -> list[StoredResponse]:
        if self.outage.skipping():
            return []
        try:
            async with asyncio.timeout(self.deadline):
                fields = await self.client.hgetall(PREFIX + "r:" + primary)
        except REDIS_FAILURES as error:
            self._failed("lookup", error)
            return []
        return [decode(primary, blob) for blob in fields.values()]

    async def put(self, response: StoredResponse) -> bool:
        if len(response.body) > self.max_object_size or self.outage.skipping():
            return False
        key = PREFIX + "r:" + response.primary
        ttl_ms = int(time_to_live(response, self.clock()) * 1000)
        member = response.primary + "\x1f" + response.secondary
        try:
            async with asyncio.timeout(self.deadline):
                if not self._version_checked:
                    await self._check_version()
                pipe = self.client.pipeline(transaction=False)
                pipe.hset(key, response.secondary, encode(response))
                _extend(pipe, key, ttl_ms)
                url_key = PREFIX + "u:" + response.url
                pipe.sadd(url_key, response.primary)
                _extend(pipe, url_key, ttl_ms)
                for tag in response.tags:
                    tag_key = PREFIX + "t:" + tag
                    pipe.sadd(tag_key, member)
                    _extend(pipe, tag_key, ttl_ms)
                await pipe.execute()
        except REDIS_FAILURES as error:
            self._failed("store", error)
            return False
        return True

    async def freshen(
        self, response: StoredResponse, headers: list[tuple[bytes, bytes]], freshness: Freshness
    ) -> None:
        response.headers = headers
        response.freshness = freshness
        await self.put(response)

    async def delete(self, primary: str) -> int:
        key = PREFIX + "r:" + primary
        try:
            async with asyncio.timeout(self.deadline):
                pipe = self.client.pipeline(transaction=False)  # one key: one slot, in order
                pipe.hlen(key)
                pipe.delete(key)
                count, _ = await pipe.execute()
        except REDIS_FAILURES as error:
            self._failed("delete", error)
            return 0
        return int(count)

    async def purge_url(self, url: str) -> int:
        try:
            async with asyncio.timeout(self.deadline):
                primaries = await self.client.smembers(PREFIX + "u:" + url)
                await self.client.delete(PREFIX + "u:" + url)
        except REDIS_FAILURES as error:
            self._failed("purge", error)
            return 0
        count = 0
        for primary in primaries:
            count += await self.delete(primary.decode("latin-1"))
        return count

    async def purge_prefix(self, prefix: str) -> int:
        """SCAN for the URL index keys: a cluster client scans every master."""
        pattern = PREFIX + "u:" + prefix.translate(_GLOB_SPECIALS) + "*"
        count = 0
        try:
            urls = [key async for key in self.client.scan_iter(match=pattern, count=1000)]
        except REDIS_FAILURES as error:
            self._failed("purge", error)
            return 0
        skip = len(PREFIX + "u:")
        for url_key in urls:
            count += await self.purge_url(url_key.decode("latin-1")[skip:])
        return count

    async def purge_tag(self, tag: str) -> int:
        tag_key = PREFIX + "t:" + tag
        try:
            async with asyncio.timeout(self.deadline):
                members = await self.client.smembers(tag_key)
                pipe = self.client.pipeline(transaction=False)
                pipe.delete(tag_key)
                for member in members:
                    primary, _, secondary = member.decode("latin-1").partition("\x1f")
                    pipe.hdel(PREFIX + "r:" + primary, secondary)
                removed = await pipe.execute()
        except REDIS_FAILURES as error:
            self._failed("purge", error)
            return 0
        return sum(int(n) for n in removed[1:])

    async def _check_version(self) -> None:
        """PEXPIRE's GT and NX options need Redis 7: say so once when it is older (every
        store then fails, and the cache works as a pass-through)."""
        self._version_checked = True
        info = await self.client.info("server")
        if isinstance(info, dict) and "redis_version" not in info:  # cluster: per node
            info = next(iter(info.values()), {})
        version = str(info.get("redis_version", "0"))
        if _major(version) < 7:
            log.warning(
                "cache.store: redis needs Redis 7 or later (this one is %s): nothing is stored",
                version,
                extra={"event": "cache"},
            )

    def stats(self) -> StoreStats:
        # The shared store's size is Redis's own (INFO memory, DBSIZE): not counted here.
        return StoreStats(0, 0, 0)

    def _failed(self, what: str, error: BaseException) -> None:
        self.outage.failed()
        now = time.monotonic()
        if now - self._last_error_logged >= ERROR_LOG_INTERVAL:
            self._last_error_logged = now
            log.warning("cache %s in Redis failed: %s", what, error, extra={"event": "cache"})


def _extend(pipe: Any, key: str, ttl_ms: int) -> None:
    """Make ``key`` live at least ``ttl_ms`` more: never shorten what another entry in it
    needs (GT), and set it on a key that had no expiry yet (NX)."""
    pipe.pexpire(key, ttl_ms, gt=True)
    pipe.pexpire(key, ttl_ms, nx=True)


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0
