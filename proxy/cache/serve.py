"""The cache as the request pipeline sees it: one filter per cached route.

``RouteCache`` is a request filter (``proxy.pipeline.filters``). ``on_request(ex)``
answers a fresh hit from a store that answers at once (memory) there and then; anything
that has to wait (a Redis lookup, the stampede lock's leader, another instance's) runs as
a task the exchange is suspended on, whose result says whether the request was answered
(``resume``). A request that goes upstream has its ``_CachedRequest`` as the exchange's
``response_filter``, which the pipeline calls with the upstream's response head
(``relay``: store it as it streams to the client, or answer a revalidation's 304 from the
store), when the upstream failed (``upstream_failed``: stale-if-error), and when the
exchange is over (``exchange_over``: the result counted, the stampede lock released).
It uses the pipeline's public pieces only (``answer``, ``relay``, ``framing``).

``SharedCache`` is what every cached route of a process shares: the store, the stampede
lock, the clock. A reload keeps it when the top-level ``cache`` section is unchanged.

Every answer on a cached route carries ``Cache-Status`` (RFC 9211) and, from the store,
``Age``; the result word (hit, miss, stale, revalidated, coalesced, bypass) is counted per
route and written to the access log.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from typing import Any

from proxy import redisconn
from proxy.balancing.retry import FailureKind, status_word
from proxy.cache.control import CacheControl, field_value, parse_http_date, request_control
from proxy.cache.hit import HIT_STATUS, FreshHits, send_prepared
from proxy.cache.key import KeyMaker, cache_url, url_from_purge
from proxy.cache.lock import Outcome, StampedeLock
from proxy.cache.memory import MemoryStore
from proxy.cache.outage import Outage
from proxy.cache.policy import (
    Use,
    compute_freshness,
    decide_storage,
    judge,
    may_serve_on_error,
    stored_headers,
    updated_headers,
    vary_names,
)
from proxy.cache.purgebus import Purge, PurgeBus
from proxy.cache.redislock import RedisLock
from proxy.cache.redisstore import RedisStore
from proxy.cache.store import BodyWriter, StoredResponse, tags_of
from proxy.cache.variance import matches, variance
from proxy.dataplane.upstream import HeadFuture, ResponseHead, UpstreamError
from proxy.observability import metrics
from proxy.pipeline.answer import send_buffered, send_error
from proxy.pipeline.compress import negotiate
from proxy.pipeline.framing import request_head
from proxy.pipeline.relay import relay_over, start_relay
from proxy.pipeline.verdict import Verdict
from proxy.redisconn import SharedRedis

log = logging.getLogger("sluicegate")

# RFC 9111 §4.4: a method not known to be safe invalidates (M-SEARCH and the like too).
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
CONDITIONAL_FIELDS = frozenset(
    {b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range"}
)
# What most requests carry: no Cache-Control, no Pragma (one shared, never changed).
NO_DIRECTIVES = CacheControl({}, frozenset())


class SharedCache:
    """The store and stampede lock every cached route of this process uses."""

    def __init__(
        self,
        config: Any,
        previous: SharedCache | None = None,
        clock: Callable[[], float] = time.time,
        redis_config: Any = None,
    ) -> None:
        self.config = config
        self.redis_config = redis_config
        self.clock = clock
        # Under a supervisor, the id its workers share on the purge bus (``start``).
        self.instance: str | None = previous.instance if previous is not None else None
        same_redis = previous is not None and previous.redis_config == redis_config
        if (
            previous is not None
            and previous.config == config
            and (config.store != "redis" or same_redis)
        ):
            self.store: Any = previous.store
            self.lock: StampedeLock = previous.lock
            self.remote_lock: RedisLock | None = previous.remote_lock
            self._evictions_told = previous._evictions_told
            self._background = previous._background
            if same_redis:
                self.redis, self.subscriber = previous.redis, previous.subscriber
                self.bus: PurgeBus | None = previous.bus
                if self.bus is not None:
                    self.bus.apply = self._apply  # the same store, booked by this generation
            else:  # the memory store stays; its purge bus follows the new redis section
                self._open_bus(redis_config)
                self._close_later(previous)
        else:
            self.redis: SharedRedis | None = None
            self.subscriber: SharedRedis | None = None
            self.bus = None
            if config.store == "redis":
                self.redis, self.subscriber = open_redis(redis_config)
                deadline = call_deadline(redis_config)
                outage = Outage()  # one failed call spares the store and the lock alike
                self.store = RedisStore(
                    self.redis.client,
                    config.max_object_size,
                    clock=clock,
                    deadline=deadline,
                    outage=outage,
                )
                self.remote_lock = RedisLock(
                    self.redis.client,
                    config.lock_timeout,
                    subscriber=self.subscriber.client,
                    deadline=deadline,
                    outage=outage,
                )
            else:
                self.store = MemoryStore(config.max_size, config.max_object_size)
                self.remote_lock = None
                self._open_bus(redis_config)
            self.lock = StampedeLock(config.lock_timeout)
            self._evictions_told = 0
            self._background: set[asyncio.Task[None]] = set()
            if previous is not None and previous.redis is not None:
                self._close_later(previous)  # its clients are nobody's now
        self.start()

    def _open_bus(self, redis_config: Any) -> None:
        """A memory store with Redis configured: purges go to every instance's store."""
        self.redis = self.subscriber = self.bus = None
        if redis_config is None:
            return
        self.redis, self.subscriber = open_redis(redis_config)
        self.bus = PurgeBus(
            self.redis.client,
            self.subscriber.client,
            self._apply,
            deadline=call_deadline(redis_config),
        )

    def start(self, instance: str | None = None) -> None:
        """Listen for the other instances' purges (once a loop runs: a config check has
        none, and a daemon calls this again when it starts serving). ``instance``: the
        id a supervisor's workers share (None: this process is the instance)."""
        if instance is not None:
            self.instance = instance
        if self.bus is None:
            return
        if self.instance is not None:
            self.bus.instance = self.instance
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self.bus.start()

    def report(self) -> None:
        """The store's size to the gauges, and evictions since the last report."""
        stats = self.store.stats()
        metrics.cache_store(stats.objects, stats.bytes, stats.evictions - self._evictions_told)
        self._evictions_told = stats.evictions

    async def purge(self, by: str, value: str) -> int:
        """The admin purge: by "url", "prefix" or "tag"; how many this store removed (the
        other instances' memory stores are told, and count their own)."""
        purge = Purge(by, (value if by == "tag" else url_from_purge(value),))
        count = await self._apply(purge)
        if self.bus is not None:
            await self.bus.publish(purge)
        return count

    async def invalidate(self, urls: set[str]) -> None:
        """An unsafe method's invalidation (RFC 9111 §4.4): here, then (in the background,
        off the response's path) on every other instance's memory store."""
        purge = Purge("invalidation", tuple(sorted(urls)))
        await self._apply(purge)
        if self.bus is not None:
            self.in_background(self.bus.publish(purge))

    async def _apply(self, purge: Purge) -> int:
        """``purge`` on this process's store, counted under its ``by``."""
        store = self.store
        match = {
            "url": store.purge_url,
            "prefix": store.purge_prefix,
            "tag": store.purge_tag,
        }[purge.kind]
        count = 0
        for value in purge.values:
            count += await match(value)
        metrics.cache_purged(purge.by, count)
        self.report()
        return count

    async def aclose(self) -> None:
        """Stop the lock's or the purge bus's subscription and close the Redis clients."""
        if self.remote_lock is not None:
            self.remote_lock.stop()
        if self.bus is not None:
            self.bus.stop()
        for shared in (self.redis, self.subscriber):
            if shared is not None:
                try:
                    await shared.aclose()
                except Exception as error:  # closing a dead Redis may fail: nothing to do
                    log.debug("closing the cache's Redis client: %s", error)

    def _close_later(self, replaced: SharedCache) -> None:
        """A reload replaced ``replaced``: close what it opened, off the reload's path."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a config check): nothing was ever connected
        self.in_background(replaced.aclose())

    def in_background(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._background.discard)


def call_deadline(redis_config: Any) -> float:
    """How long one cache call to Redis may take in all: a connect and a read (each at
    most ``redis.timeout``, at least 250 ms so that a body of a few MiB gets through)."""
    return 2 * max(redis_config.timeout, 0.25)


def open_redis(redis_config: Any) -> tuple[SharedRedis, SharedRedis]:
    """The cache's clients for the configured Redis, in any mode (``redisconn``): one for
    calls, whose reads time out, and one for the lock's subscription, which waits for
    news as long as it takes. A Redis that fails is a miss, never an error."""
    timeout = max(redis_config.timeout, 0.25)
    calls = redisconn.connect(redis_config, connect_timeout=timeout, socket_timeout=timeout)
    subscriber = redisconn.connect(redis_config, connect_timeout=timeout)
    return calls, subscriber


BYPASSED_BY_LIMIT = b"Cache-Status: sluicegate; fwd=bypass; detail=rate-limit\r\n"


class Result(enum.Enum):
    HIT = "hit"
    MISS = "miss"
    STALE = "stale"
    REVALIDATED = "revalidated"
    COALESCED = "coalesced"
    BYPASS = "bypass"


class RouteCache:
    """A cached route's part of the cache: its key parts, heuristic, and counters."""

    def __init__(self, route_config: Any, shared: SharedCache, route_metrics: Any) -> None:
        self.keys = KeyMaker.from_config(route_config.cache.key)
        self.heuristic = route_config.cache.heuristic
        self.shared = shared
        self.metrics = route_metrics
        self.compress_algorithms: tuple[str, ...] | None = (
            route_config.compress.algorithms if route_config.compress is not None else None
        )
        self.counts = dict.fromkeys((r.value for r in Result), 0)
        # A store that answers at once (memory) lets a plain fresh hit skip the rest. It
        # answers without joining the upstream group (nothing of the group is used: the
        # retry budget would count it in and out within the same call); the access log
        # still names the upstream, as for every request on the route.
        self.variants_now = getattr(shared.store, "variants_now", None)
        self.fresh_hits: FreshHits | None = (
            FreshHits(
                shared.store,
                self.keys,
                shared.clock,
                self.counts,
                route_metrics,
                route_config.upstream,
            )
            if self.variants_now is not None and route_config.compress is None
            else None
        )

    def status(self) -> dict[str, int]:
        stats = self.shared.store.stats()
        return {
            "hits": self.counts["hit"] + self.counts["coalesced"],
            "misses": self.counts["miss"],
            "stale": self.counts["stale"],
            "objects": stats.objects,
            "bytes": stats.bytes,
        }

    def on_request(self, ex: Any) -> Verdict:
        """Answered at once from a store that answers at once (a hit needs no task), on
        upstream at once (an unsafe method), or suspended on the lookup's task."""
        # The path most hits take (hit.py): a plain GET for a key with one variant.
        fresh_hits = self.fresh_hits
        entry = fresh_hits.lookup(ex) if fresh_hits is not None else None
        if entry is not None and fresh_hits.answer(ex, entry):  # type: ignore[union-attr]
            return Verdict.ANSWERED
        request = ex.request
        ex.join_group()  # not answered at once: it counts as its group's request
        cached = _CachedRequest(self, ex)
        if cached.answer_now([entry] if entry is not None else None):
            return Verdict.ANSWERED
        if request.method not in (b"GET", b"HEAD"):
            cached.result = Result.BYPASS
            cached.status_word = b"fwd=bypass"
            cached.begin_forward()
            return Verdict.CONTINUE
        ex.suspend(asyncio.get_running_loop().create_task(cached.before_forward()))
        return Verdict.SUSPENDED

    def resume(self, ex: Any, task: Any) -> Verdict:
        """The lookup's task is done: True when it answered (its failure, a bug, raises)."""
        return Verdict.ANSWERED if task.result() else Verdict.CONTINUE

    def bypassed(self, ex: Any) -> bytes:
        """The proxy answers before the cache (429, or 503 with the limiter down): counted
        as a bypass, and the Cache-Status field that says so (RFC 9211 ``fwd=bypass``)."""
        self.count(ex, Result.BYPASS)
        return BYPASSED_BY_LIMIT

    def count(self, ex: Any, result: Result) -> None:
        word = result.value
        self.counts[word] += 1
        self.metrics.cache_result(word)
        ex.cache_status = word


class _CachedRequest:
    """One request on a cached route; the exchange's ``response_filter`` when forwarded."""

    def __init__(self, route_cache: RouteCache, ex: Any) -> None:
        self.cache = route_cache
        self.shared = route_cache.shared
        self.store = route_cache.shared.store
        self.ex = ex
        request = ex.request
        self.request = request
        self.url = cache_url(request.host, request.path, request.target)
        self.primary = route_cache.keys.primary(self.url, request.header)
        lowered = request.lowered
        self.control: CacheControl = (
            request_control(request.headers)
            if b"cache-control" in lowered or b"pragma" in lowered
            else NO_DIRECTIVES
        )
        self.revalidating: StoredResponse | None = None  # the entry a conditional asks about
        self.leading = False  # holds the stampede lock for its key, until exchange_over
        self.leading_remote = False  # ... and the other instances' (a shared store)
        self.stored = False
        self.result = Result.MISS
        self.status_word = b"fwd=uri-miss"
        self.found: tuple[StoredResponse | None, bool] | None = None  # looked up at once
        self.base_extra = ex.extra_headers  # RateLimit-*: Cache-Status goes after them
        # The client's own conditionals (a revalidation replaces them with the entry's).
        self.if_none_match = (
            request.header(b"if-none-match") if b"if-none-match" in lowered else None
        )
        self.if_modified_since = (
            request.header(b"if-modified-since") if b"if-modified-since" in lowered else None
        )

    # -- the request ------------------------------------------------------------------------

    async def before_forward(self) -> bool:
        """A GET or HEAD the store could not answer at once: look it up, and answer from
        the store when it may (True); else set it up to go upstream (False)."""
        ex = self.ex
        if self.found is None:
            entry, any_variant = await self.lookup()
            if entry is not None and self.answer_from(entry):
                return True
        else:  # answer_now() looked, and answer_from() did not answer
            entry, any_variant = self.found
        if entry is None and any_variant:
            self.status_word = b"fwd=miss"
        if "only-if-cached" in self.control:
            self.cache.count(ex, Result.MISS)
            ex.extra_headers += b"Cache-Status: sluicegate; " + self.status_word + b"\r\n"
            send_error(ex, 504, "not in cache (only-if-cached)", ex.extra_headers)
            return True
        if self.revalidating is not None or self.request.method == b"HEAD":
            self.begin_forward()
            return False
        return await self.lead_or_follow()

    def answer_now(self, variants: list[StoredResponse] | None = None) -> bool:
        """Answer from a store that answers at once (memory), when the entry allows;
        ``variants`` when the route has looked them up already."""
        variants_now = self.cache.variants_now
        if variants_now is None or self.request.method not in (b"GET", b"HEAD"):
            return False
        if variants is None:
            variants = variants_now(self.primary)
        self.found = self.choose(variants)
        entry = self.found[0]
        return entry is not None and self.answer_from(entry)

    async def lookup(self) -> tuple[StoredResponse | None, bool]:
        """The stored variant this request may use, and whether any variant exists."""
        return self.choose(await self.store.variants(self.primary))

    def choose(self, variants: list[StoredResponse]) -> tuple[StoredResponse | None, bool]:
        for entry in variants:
            if matches(entry.variance, self.request_values):
                return entry, True
        return None, bool(variants)

    def request_values(self, lowered_name: bytes) -> list[bytes]:
        """A request field's values as Vary compares them. Accept-Encoding on a compressing
        route is the coding it negotiates to, so that equivalent lists share one variant."""
        request = self.request
        values = [
            value
            for (_, value), lowered in zip(request.headers, request.lowered, strict=True)
            if lowered == lowered_name
        ]
        algorithms = self.cache.compress_algorithms
        if lowered_name == b"accept-encoding" and algorithms is not None:
            chosen = negotiate(b", ".join(values) if values else None, algorithms)
            return [(chosen or "identity").encode()]
        return values

    def answer_from(self, entry: StoredResponse) -> bool:
        """Answer from ``entry`` when its freshness allows; else set up its revalidation."""
        ex = self.ex
        now = self.shared.clock()
        use = judge(entry.freshness, self.control, now)
        if use is Use.FRESH:
            self.cache.count(ex, Result.HIT)
            if not self.send_prepared(entry, now):
                self.send_stored(entry, b"hit", now)
            return True
        if use is Use.STALE:
            self.cache.count(ex, Result.STALE)
            self.send_stored(entry, b"hit; detail=stale", now)
            return True
        if use is Use.STALE_WHILE_REVALIDATE:
            self.cache.count(ex, Result.STALE)
            self.send_stored(entry, b"hit; detail=stale-while-revalidate", now)
            key = "revalidate\x1f" + self.primary
            if self.shared.lock.lead(key):  # one background revalidation per key
                self.shared.in_background(self.revalidate_in_background(key, entry))
            return True
        self.revalidating = entry
        self.status_word = b"fwd=stale"
        self.make_conditional(entry)
        return False

    async def lead_or_follow(self) -> bool:
        """A miss: the first goes upstream, concurrent ones wait for it (stampede lock:
        within the process, and across instances with a shared store). True when a
        follower was answered from what the leader stored; a leader holds the locks
        until its exchange is over (``exchange_over``)."""
        lock = self.shared.lock
        primary = self.primary
        if not lock.lead(primary):
            if await lock.follow(primary) is Outcome.STORED and await self.answer_collapsed():
                return True
            self.begin_forward()
            return False
        self.leading = True
        try:
            remote = self.shared.remote_lock
            if remote is not None:
                if await remote.lead(primary):
                    self.leading_remote = True
                elif (
                    await remote.follow(primary) is Outcome.STORED and await self.answer_collapsed()
                ):
                    self.release_locks(Outcome.STORED)
                    return True
        except BaseException:
            self.release_locks(Outcome.NOT_STORED)
            raise
        self.begin_forward()
        return False

    def release_locks(self, outcome: Outcome) -> None:
        """The stampede locks this request leads: the other instances' first (off the
        request's path, in the background), then this process's."""
        if self.leading_remote:
            self.leading_remote = self.leading = False
            self.shared.in_background(self._release_remote(outcome))
        elif self.leading:
            self.leading = False
            self.shared.lock.release(self.primary, outcome)

    async def _release_remote(self, outcome: Outcome) -> None:
        try:
            await self.shared.remote_lock.release(self.primary, outcome)  # type: ignore[union-attr]
        finally:
            self.shared.lock.release(self.primary, outcome)

    def stored_outcome(self) -> Outcome:
        return Outcome.STORED if self.stored else Outcome.NOT_STORED

    async def answer_collapsed(self) -> bool:
        """After waiting for another request's answer: answer from the store if we may."""
        entry, _ = await self.lookup()
        if entry is None:
            return False
        now = self.shared.clock()
        if judge(entry.freshness, self.control, now) not in (Use.FRESH, Use.STALE):
            return False
        self.cache.count(self.ex, Result.COALESCED)
        self.send_stored(entry, b"fwd=uri-miss; collapsed", now)
        return True

    def begin_forward(self) -> None:
        """On upstream, with this as the exchange's response filter."""
        ex = self.ex
        ex.response_filter = self
        # Errors the proxy makes carry the same Cache-Status; relay() adds "stored".
        self.cache_status_headers(ex)

    def exchange_over(self, ex: Any) -> None:
        """The forwarded exchange is over, however it ended: its result counted (unless
        the relay counted one), the stampede locks it leads released."""
        if not ex.cache_status:
            self.cache.count(ex, self.result)
        self.release_locks(self.stored_outcome())

    def cache_status_headers(self, ex: Any, stored: bool = False) -> None:
        value = b"sluicegate; " + self.status_word + (b"; stored" if stored else b"")
        ex.extra_headers = self.base_extra + b"Cache-Status: " + value + b"\r\n"

    def make_conditional(self, entry: StoredResponse) -> None:
        """Ask the origin whether ``entry`` is still good: its validators replace the
        client's own conditionals (those are answered from the entry afterwards)."""
        request = self.request
        kept = [
            (field, lowered)
            for field, lowered in zip(request.headers, request.lowered, strict=True)
            if lowered not in CONDITIONAL_FIELDS
        ]
        request.headers = [field for field, _ in kept]
        request.lowered = [lowered for _, lowered in kept]
        etag = field_value(entry.headers, b"etag")
        if etag is not None:
            request.add_header(b"If-None-Match", etag)
        last_modified = field_value(entry.headers, b"last-modified")
        if last_modified is not None:
            request.add_header(b"If-Modified-Since", last_modified)

    # -- the response (called by forwarding) ----------------------------------------------

    async def relay(self, ex: Any, response: Any, upstream: Any) -> bool:
        """Relay ``response`` to the client (storing it as it goes, when storable), or
        answer from the store: True when ``upstream`` ended cleanly and may be reused."""
        request = self.request
        now = self.shared.clock()
        if request.method not in SAFE_METHODS and 200 <= response.status < 400:
            await self.invalidate(response)
        entry = self.revalidating
        if entry is not None:
            if response.status == 304:
                await upstream.wait_done()
                await self.freshen(entry, response, now)
                self.cache.count(ex, Result.REVALIDATED)
                self.send_stored(entry, b"fwd=stale; fwd-status=304", self.shared.clock())
                return True
            if response.status >= 500 and may_serve_on_error(entry.freshness, self.control, now):
                self.cache.count(ex, Result.STALE)
                self.send_stored(entry, b"fwd=stale; fwd-status=%d" % response.status, now)
                return False
        decision = None
        if request.method == b"GET" and response.status != 304:
            decision = decide_storage(
                method=request.method,
                status=response.status,
                headers=response.headers,
                request_control=self.control,
                has_authorization=b"authorization" in request.lowered,
                heuristic=self.cache.heuristic,
                request_time=self.started,
                response_time=now,
            )
            if not decision.storable:
                decision = None
        length = response.content_length
        if decision is not None and length is not None and length > self.store.max_object_size:
            decision = None  # streams through
        # RFC 9211 ``stored``: said before the body is relayed, so only when the length is
        # declared and fits (then only a broken relay or a failing store can undo it). A
        # body of unknown length may still be stored, once it has arrived within the limit.
        self.cache_status_headers(ex, stored=decision is not None and length is not None)
        writer = BodyWriter(self.store.max_object_size) if decision is not None else None
        relay = start_relay(ex, response, upstream, tap=writer)
        try:
            await upstream.wait_done()
        finally:
            relay_over(ex, relay)
        if writer is not None and decision is not None:
            body = writer.body()
            if body is not None:
                await self.put(response, decision, body)
        self.cache.count(ex, self.result)
        return True

    def upstream_failed(self, ex: Any, last_response: Any) -> bool:
        """No good answer came: answer stale where stale-if-error allows (True)."""
        entry = self.revalidating
        if entry is None:
            return False
        now = self.shared.clock()
        if not may_serve_on_error(entry.freshness, self.control, now):
            return False
        self.cache.count(ex, Result.STALE)
        status = b"fwd=stale"
        if last_response is not None:
            status += b"; fwd-status=%d" % last_response[0].status
        self.send_stored(entry, status, now)
        return True

    @property
    def started(self) -> float:
        # The exchange's start (its own clock), on the store's clock.
        ex = self.ex
        return self.shared.clock() - (ex.clock() - ex.started)

    # -- the store -------------------------------------------------------------------------

    async def put(self, response: Any, decision: Any, body: bytes) -> None:
        headers = stored_headers(response.headers, decision.strip)
        entry = StoredResponse(
            primary=self.primary,
            url=self.url,
            variance=variance(vary_names(headers), self.request_values),
            status=response.status,
            reason=response.reason,
            headers=headers,
            body=body,
            freshness=decision.freshness,
            tags=tags_of(headers),
        )
        self.stored = await self.store.put(entry)
        self.shared.report()

    async def freshen(self, entry: StoredResponse, response: Any, now: float) -> None:
        headers = updated_headers(entry.headers, response.headers)
        freshness = compute_freshness(
            entry.status, headers, self.cache.heuristic, self.started, now
        )
        await self.store.freshen(entry, headers, freshness)
        self.shared.report()

    async def invalidate(self, response: Any) -> None:
        """An unsafe method succeeded: what is stored for its target (and for a same-host
        Location / Content-Location) is out of date (RFC 9111 §4.4)."""
        urls = {self.url}
        host = (self.request.host or b"").lower().decode("latin-1")
        for name in (b"location", b"content-location"):
            value = field_value(response.headers, name)
            if value is None:
                continue
            text = value.decode("latin-1").strip()
            if text.startswith("/"):
                urls.add(host + text)
            elif "://" in text and url_from_purge(text).partition("/")[0] == host:
                urls.add(url_from_purge(text))
        await self.shared.invalidate(urls)

    async def revalidate_in_background(self, key: str, entry: StoredResponse) -> None:
        try:
            await _background_revalidation(self, entry)
        finally:
            self.shared.lock.release(key, Outcome.NOT_STORED)

    # -- answering from the store ---------------------------------------------------------

    def send_prepared(self, entry: StoredResponse, now: float) -> bool:
        """A fresh hit for a plain GET from its prepared head; False when this answer
        needs the general path (a conditional, HEAD, compression, trace)."""
        ex = self.ex
        if (
            self.request.method != b"GET"
            or self.if_none_match is not None
            or self.if_modified_since is not None
            or ex.trace is not None
            or ex.route_runtime.compress is not None
        ):
            return False
        send_prepared(ex, entry, entry.freshness.age(now), self.base_extra + HIT_STATUS)
        return True

    def send_stored(self, entry: StoredResponse, status_word: bytes, now: float) -> None:
        ex = self.ex
        request = self.request
        head = ResponseHead()
        head.reason = entry.reason
        headers = [(n, v) for n, v in entry.headers if n.lower() != b"content-length"]
        age = int(entry.freshness.age(now))
        headers.append((b"Age", b"%d" % age))
        status = entry.status
        if _not_modified(self.if_none_match, self.if_modified_since, entry):
            status = 304
            head.reason = b"Not Modified"
        head.status = status
        head.has_body = request.method != b"HEAD" and status not in (204, 304)
        if status != 304:
            headers.append((b"Content-Length", b"%d" % len(entry.body)))
        head.headers = headers
        head.lowered = [name.lower() for name, _ in headers]
        head.content_length = len(entry.body)
        ex.extra_headers = self.base_extra + b"Cache-Status: sluicegate; " + status_word + b"\r\n"
        send_buffered(ex, head, entry.body if head.has_body else b"")


def _not_modified(
    if_none_match: bytes | None, if_modified_since_value: bytes | None, entry: StoredResponse
) -> bool:
    """The client's own conditional, answered from the stored response (RFC 9110 §13)."""
    if entry.status != 200:
        return False
    if if_none_match is not None:
        etag = field_value(entry.headers, b"etag")
        if etag is None:
            return False
        if if_none_match.strip() == b"*":
            return True
        wanted = _opaque(etag)
        return any(_opaque(tag) == wanted for tag in if_none_match.split(b","))
    if_modified_since = parse_http_date(if_modified_since_value)
    if if_modified_since is None:
        return False
    last_modified = parse_http_date(field_value(entry.headers, b"last-modified"))
    if last_modified is None:
        last_modified = parse_http_date(field_value(entry.headers, b"date"))
    return last_modified is not None and last_modified <= if_modified_since


def _opaque(tag: bytes) -> bytes:
    """Weak comparison: the opaque tag without W/."""
    tag = tag.strip()
    return tag[2:] if tag.startswith(b"W/") else tag


async def _background_revalidation(cached: _CachedRequest, entry: StoredResponse) -> None:
    """stale-while-revalidate: a conditional request of our own, off the client's path,
    booked like any other try on its server (counters, metrics, latency, breaker)."""
    ex = cached.ex
    group = ex.group
    server = group.select(ex.key, set())
    if server is None or not server.breaker.acquire():
        return
    request = cached.request
    cached.make_conditional(entry)
    head_bytes = request_head(ex.conn, request, ex.route_runtime, chunked=False)
    pool = server.pool
    books = _BackgroundTry(server, group.failure_on, ex.clock)
    upstream = None
    try:
        upstream = pool.take_idle() or await pool.connect()
        waiter = HeadFuture(loop=asyncio.get_running_loop())
        upstream.begin(False, waiter)
        upstream.send_request(head_bytes)
        response = await waiter
        books.head(response.status)
        collector = BodyWriter(cached.store.max_object_size)
        upstream.attach(_WriterSink(collector))
        await upstream.wait_done()
        now = cached.shared.clock()
        if response.status == 304:
            await cached.freshen(entry, response, now)
        else:
            body = collector.body()
            decision = decide_storage(
                method=b"GET",
                status=response.status,
                headers=response.headers,
                request_control=CacheControl({}, frozenset()),
                has_authorization=b"authorization" in request.lowered,
                heuristic=cached.cache.heuristic,
                request_time=now,
                response_time=now,
            )
            if decision.storable and body is not None and response.status < 500:
                await cached.put(response, decision, body)
        pool.release(upstream)
        upstream = None
    except UpstreamError as error:  # the stale entry stays as it is
        books.no_answer(error.kind)
    except Exception:  # a failed background revalidation leaves the stale entry as it is
        books.no_answer(FailureKind.ERROR)
    finally:
        if upstream is not None:
            upstream.abort()
        books.settle()


class _BackgroundTry:
    """What a try owes its server when no client exchange carries it (``Attempt`` does
    for the others): in-flight and request counts, the head's status and latency, the
    latency sample, and the breaker's verdict."""

    __slots__ = ("clock", "failure_on", "server", "started", "verdict")

    def __init__(self, server: Any, failure_on: Any, clock: Callable[[], float]) -> None:
        self.server = server
        self.failure_on = failure_on
        self.clock = clock  # the exchange's
        self.started = clock()
        self.verdict: bool | None = None
        server.in_flight += 1
        server.requests += 1
        server.metrics.in_flight_inc()

    def head(self, status: int) -> None:
        server = self.server
        seconds = self.clock() - self.started
        server.observe_latency(seconds)
        server.metrics.response(status, seconds)
        server.status_classes[status // 100] += 1
        self.verdict = status_word(status) not in self.failure_on
        if not self.verdict:
            server.failures += 1

    def no_answer(self, kind: FailureKind) -> None:
        server = self.server
        if self.verdict is None:  # before a head: no answer at all
            server.metrics.response(kind, None)
            server.count_no_answer(kind)
        if kind in self.failure_on and self.verdict is not False:
            server.failures += 1
            self.verdict = False

    def settle(self) -> None:
        server = self.server
        server.in_flight -= 1
        server.metrics.in_flight_dec()
        server.stats.record(self.clock() - self.started, self.verdict is False)
        if self.verdict is True:
            server.breaker.record_success()
        elif self.verdict is False:
            server.breaker.record_failure()
        else:
            server.breaker.release()


class _WriterSink:
    """An upstream body into a ``BodyWriter`` (no client on the other end)."""

    __slots__ = ("writer",)

    def __init__(self, writer: BodyWriter) -> None:
        self.writer = writer

    def on_body(self, chunk: bytes) -> None:
        self.writer.write(chunk)

    def on_end(self) -> None:
        pass

    def on_abort(self, error: Exception) -> None:
        self.writer.abandon()
