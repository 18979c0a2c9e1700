"""The shared Redis store against a real redis-server, and two daemons sharing it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import redis.asyncio

from proxy.cache.policy import Freshness
from proxy.cache.redisstore import RedisStore, decode, encode, time_to_live
from proxy.cache.store import StoredResponse
from tests.integration.test_cache_e2e import Origin, cached_config, fresh_for
from tests.support.daemon import wait_for
from tests.support.rawupstream import RawUpstream

NOW = 1_700_000_000.0
FRESH = Freshness(60.0, 0.0, NOW, False, False, 0.0, 0.0)


def response(primary: str, body: bytes = b"x", *, url=None, tags=(), vary=(), headers=None):
    return StoredResponse(
        primary=primary,
        url=url or primary,
        variance=vary,
        status=200,
        reason=b"OK",
        headers=headers if headers is not None else [(b"Content-Type", b"text/plain")],
        body=body,
        freshness=FRESH,
        tags=tags,
    )


def store_for(server, **kwargs) -> RedisStore:
    return RedisStore(redis.asyncio.from_url(server.url), 1 << 20, clock=lambda: NOW, **kwargs)


def test_encoding_round_trip():
    original = response("k\x1fv", b"\x00\xffbody", vary=(("accept", "a"), ("x", None)), tags=("t",))
    copy = decode("k\x1fv", encode(original))
    assert (copy.url, copy.variance, copy.status, copy.reason) == (
        original.url,
        original.variance,
        200,
        b"OK",
    )
    assert (copy.headers, copy.body, copy.freshness, copy.tags) == (
        original.headers,
        original.body,
        original.freshness,
        original.tags,
    )


def test_time_to_live_keeps_validated_entries_for_revalidation():
    assert time_to_live(response("k"), NOW) == 60
    validated = response("k", headers=[(b"ETag", b'"a"')])
    assert time_to_live(validated, NOW) == 60 + 86400
    assert time_to_live(response("k"), NOW + 1000) == 1  # never 0: PEXPIRE 0 deletes


async def test_put_variants_freshen_delete(redis_server):
    store = store_for(redis_server)
    assert await store.put(response("h/a", b"fr", vary=(("accept-language", "fr"),)))
    assert await store.put(response("h/a", b"de", vary=(("accept-language", "de"),)))
    found = await store.variants("h/a")
    assert sorted(r.body for r in found) == [b"de", b"fr"]
    ttl = redis_server.client().pttl("sluicegate:cache:r:h/a")
    assert 59_000 < ttl <= 60_000
    later = Freshness(99.0, 0.0, NOW, False, False, 0.0, 0.0)
    await store.freshen(found[0], [(b"X-New", b"1")], later)
    refreshed = {r.body: r for r in await store.variants("h/a")}
    assert refreshed[found[0].body].headers == [(b"X-New", b"1")]
    assert refreshed[found[0].body].freshness == later
    assert await store.delete("h/a") == 2
    assert await store.variants("h/a") == []


async def test_purges_by_url_prefix_and_tag(redis_server):
    store = store_for(redis_server)
    await store.put(response("h/a?1", url="h/a?1", tags=("t1",)))
    await store.put(response("h/a?1\x1ffr", url="h/a?1", tags=("t2",)))
    await store.put(response("h/b/c", url="h/b/c", tags=("t1", "t2")))
    await store.put(response("h/b/d*", url="h/b/d*"))
    await store.put(response("g/b/e", url="g/b/e", tags=("t3",)))
    assert await store.purge_url("h/a?1") == 2
    assert await store.purge_tag("t2") == 1
    assert await store.purge_prefix("h/b/") == 1
    assert await store.purge_prefix("h/*") == 0  # glob characters are literal
    assert await store.purge_tag("t3") == 1
    assert await store.purge_tag("t1") == 0  # its members are gone already
    assert redis_server.client().keys("sluicegate:cache:r:*") == []


async def test_too_large_is_refused(redis_server):
    store = RedisStore(redis.asyncio.from_url(redis_server.url), 10)
    assert not await store.put(response("k", b"x" * 11))


async def test_a_redis_outage_is_a_miss_not_an_error(redis_server):
    store = store_for(redis_server)
    await store.put(response("k"))
    redis_server.stop()
    assert await store.variants("k") == []
    assert not await store.put(response("k2"))
    assert await store.purge_url("k") == 0
    assert await store.purge_prefix("k") == 0
    assert await store.purge_tag("t") == 0
    assert await store.delete("k") == 0


def test_two_instances_share_one_cache_and_its_purges(start_sluicegate, redis_server):
    origin = Origin(fresh_for(60))
    with RawUpstream(origin) as upstream:
        config = cached_config(upstream)
        config["redis"] = {"url": redis_server.url, "timeout": "200ms"}
        config["cache"]["store"] = "redis"
        first = start_sluicegate(config)
        second = start_sluicegate(config)
        host = {"Host": "shop.example"}
        assert first.get("/shared", headers=host)[1]["cache-status"] == (
            "sluicegate; fwd=uri-miss; stored"
        )
        status, headers, body = second.get("/shared", headers=host)
        assert (status, body, headers["cache-status"]) == (200, b"hello", "sluicegate; hit")
        assert origin.count() == 1
        status, _, body = second.admin(
            "POST", "/cache/purge", body=b'{"url": "http://shop.example/shared"}'
        )
        assert (status, body) == (200, b'{"purged": 1}')
        assert first.get("/shared", headers=host)[1]["cache-status"].startswith(
            "sluicegate; fwd=uri-miss"
        )
        assert origin.count() == 2


def test_cached_routes_keep_answering_when_redis_is_down(start_sluicegate, redis_server):
    origin = Origin(fresh_for(60))
    with RawUpstream(origin) as upstream:
        config = cached_config(upstream)
        config["redis"] = {"url": redis_server.url, "timeout": "100ms"}
        config["cache"]["store"] = "redis"
        daemon = start_sluicegate(config)
        daemon.get("/r")
        redis_server.stop()
        for _ in range(2):
            status, headers, body = daemon.get("/r")
            assert (status, body) == (200, b"hello")
            assert headers["cache-status"].startswith("sluicegate; fwd=uri-miss")


async def test_redis_lock_one_leader_and_a_woken_follower(redis_server):
    from proxy.cache.lock import Outcome
    from proxy.cache.redislock import RedisLock

    one = RedisLock(redis.asyncio.from_url(redis_server.url), timeout=5.0)
    other = RedisLock(redis.asyncio.from_url(redis_server.url), timeout=5.0)
    assert await one.lead("k")
    assert not await other.lead("k")
    waiting = asyncio.ensure_future(other.follow("k"))
    await asyncio.sleep(0.05)  # let it subscribe and register
    assert not waiting.done()
    await one.release("k", Outcome.STORED)
    assert await asyncio.wait_for(waiting, 2) is Outcome.STORED
    assert await other.lead("k")  # released: free again


async def test_redis_lock_follower_times_out_and_a_released_lock_is_seen(redis_server):
    from proxy.cache.lock import Outcome
    from proxy.cache.redislock import RedisLock

    one = RedisLock(redis.asyncio.from_url(redis_server.url), timeout=5.0)
    other = RedisLock(redis.asyncio.from_url(redis_server.url), timeout=0.2)
    assert await one.lead("k")
    assert await other.follow("k") is Outcome.TIMED_OUT
    await one.release("k", Outcome.NOT_STORED)
    assert await other.follow("k") is Outcome.STORED  # nobody holds it: look again


async def test_redis_lock_without_redis_makes_everyone_leader(redis_server):
    from proxy.cache.lock import Outcome
    from proxy.cache.redislock import RedisLock

    lock = RedisLock(redis.asyncio.from_url(redis_server.url), timeout=1.0)
    redis_server.stop()
    assert await lock.lead("k")
    assert await lock.follow("k") is Outcome.TIMED_OUT
    await lock.release("k", Outcome.STORED)


def test_concurrent_misses_on_two_instances_make_one_upstream_request(
    start_sluicegate, redis_server
):
    origin = Origin(fresh_for(60, b"slow"), delay=0.5)
    with RawUpstream(origin) as upstream:
        config = cached_config(upstream)
        config["redis"] = {"url": redis_server.url, "timeout": "200ms"}
        config["cache"]["store"] = "redis"
        daemons = [start_sluicegate(config), start_sluicegate(config)]
        with ThreadPoolExecutor(40) as pool:
            results = list(
                pool.map(
                    # One Host for both: the key has the host, and each listens on its port.
                    lambda i: daemons[i % 2].get("/cold", headers={"Host": "shop.example"}),
                    range(40),
                )
            )
        assert all(status == 200 and body == b"slow" for status, _, body in results)
        assert origin.count() == 1


def _daemon_clients(redis_server) -> int:
    """The daemon's connections to Redis (not this test's own)."""
    return len(_daemon_client_ids(redis_server))


def _daemon_client_ids(redis_server) -> set[int]:
    """The ids of the daemon's connections to Redis. Redis numbers connections in the
    order they open, so an id says whether a connection is older than a moment."""
    with redis_server.client() as client:
        return {int(c["id"]) for c in client.client_list() if c["cmd"] != "client|list"}


@contextlib.contextmanager
def _warm_redis_cache(start_sluicegate, redis_server):
    """A daemon whose Redis store has answered a hit: its pool and the lock's
    subscription are open. Yields the daemon and its config."""
    origin = Origin(fresh_for(60))
    with RawUpstream(origin) as upstream:
        config = cached_config(upstream)
        config["redis"] = {"url": redis_server.url, "timeout": "200ms"}
        config["cache"]["store"] = "redis"
        daemon = start_sluicegate(config)
        daemon.get("/a")  # a lookup, the lock, a store: the store's pool and the subscription
        wait_for(lambda: daemon.get("/a")[1]["cache-status"] == "sluicegate; hit")
        assert _daemon_clients(redis_server) >= 2
        yield daemon, config


def test_a_reload_that_replaces_the_store_closes_its_redis_clients(start_sluicegate, redis_server):
    with _warm_redis_cache(start_sluicegate, redis_server) as (daemon, config):
        opened_before_last_store: set[int] = set()
        for n in range(3):  # each reload a new cache section: a new store each time
            opened_before_last_store |= _daemon_client_ids(redis_server)
            changed = dict(daemon.config)
            changed["cache"] = {**config["cache"], "lock_timeout": f"{4 + n}s"}
            daemon.write_config(changed)
            assert daemon.admin("POST", "/reload")[0] == 200
            assert daemon.get(f"/b{n}")[0] == 200
        # By id, not by count: the last store's pool may hold one connection more than
        # the warmed one did (a miss's lock and lookup can overlap), and that is no leak.
        assert opened_before_last_store
        wait_for(
            lambda: not _daemon_client_ids(redis_server) & opened_before_last_store,
            message="the replaced stores' clients closed",
        )
        assert _daemon_clients(redis_server) >= 2  # the last store's pool and subscription


def test_a_reload_that_removes_the_cache_section_closes_its_redis_clients(
    start_sluicegate, redis_server
):
    with _warm_redis_cache(start_sluicegate, redis_server) as (daemon, _):
        uncached = dict(daemon.config)
        del uncached["cache"]
        del uncached["redis"]  # nothing else uses Redis: every client of the daemon goes
        uncached["routes"] = [
            {key: value for key, value in route.items() if key != "cache"}
            for route in daemon.config["routes"]
        ]
        daemon.write_config(uncached)
        assert daemon.admin("POST", "/reload")[0] == 200
        status, headers, _ = daemon.get("/a")
        assert status == 200 and "cache-status" not in headers
        wait_for(lambda: _daemon_clients(redis_server) == 0, message="the cache's clients closed")


def test_redis_versions_before_7_are_named():
    from proxy.cache.redisstore import _major

    assert [_major(v) for v in ("7.0.15", "6.2.14", "255.255.255", "", "x.1")] == [7, 6, 255, 0, 0]


async def test_the_version_is_checked_once_at_the_first_store(redis_server, caplog):
    store = store_for(redis_server)
    assert await store.put(response("k"))
    assert store._version_checked
    assert "needs Redis 7" not in caplog.text  # the redis-server of these tests is 7 or later


def test_a_frozen_redis_costs_a_request_one_deadline_not_one_per_call(
    start_sluicegate, redis_server
):
    origin = Origin(fresh_for(60))
    with RawUpstream(origin) as upstream:
        config = cached_config(upstream)
        config["redis"] = {"url": redis_server.url, "timeout": "500ms"}
        config["cache"]["store"] = "redis"
        daemon = start_sluicegate(config)
        daemon.get("/warm")  # connected, lock subscription on
        redis_server.freeze()  # connects succeed, nothing is ever answered
        started = time.monotonic()
        status, headers, body = daemon.get("/frozen")
        took = time.monotonic() - started
        assert (status, body) == (200, b"hello")
        assert headers["cache-status"].startswith("sluicegate; fwd=uri-miss")
        # The lookup's read times out (500ms); the lock, the store and the release then
        # skip Redis (each of them would have cost as much again: 2s in all).
        assert 0.5 <= took < 1.5, took
        started = time.monotonic()
        assert daemon.get("/frozen")[0] == 200
        assert time.monotonic() - started < 0.5  # within the pause: no wait at all
