"""``cache.store: redis`` through Redis Sentinel and Redis Cluster, with real daemons.

Two daemons share one cache through the real Sentinel set or Cluster of
``tests/support/redis_server.py``: what one stores the other serves, one purge empties
it for both, the stampede lock spans them, and a master killed mid-way makes misses,
never errors.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.test_cache_e2e import Origin, cached_config, fresh_for
from tests.support.daemon import wait_for
from tests.support.rawupstream import RawUpstream
from tests.support.redis_server import PASSWORD_ENV

TIMEOUT = 0.25  # redis.timeout in these configs: the cache's own floor
HOST = {"Host": "shop.example"}  # one Host for both daemons: the key has the host
PATHS = [f"/item/{n}" for n in range(12)]  # enough keys to land on every cluster master


@pytest.fixture(params=["sentinel", "cluster"])
def redis_set(request):
    return request.getfixturevalue(f"redis_{request.param}")


def _start_two(start_sluicegate, upstream, redis_set, lock_timeout="5s"):
    config = cached_config(upstream)
    config["cache"]["store"] = "redis"
    config["cache"]["lock_timeout"] = lock_timeout
    config["redis"] = redis_set.redis_config(timeout=f"{TIMEOUT * 1000:g}ms")
    env = {PASSWORD_ENV: redis_set.password}
    return (
        start_sluicegate(config, name="first", env=env),
        start_sluicegate(config, name="second", env=env),
    )


def test_two_daemons_share_stored_responses_and_one_purge_empties_both(start_sluicegate, redis_set):
    origin = Origin(fresh_for(60))
    with RawUpstream(origin) as upstream:
        first, second = _start_two(start_sluicegate, upstream, redis_set)
        for path in PATHS:
            status, headers, _ = first.get(path, headers=HOST)
            assert (status, headers["cache-status"]) == (200, "sluicegate; fwd=uri-miss; stored")
        for path in PATHS:
            status, headers, body = second.get(path, headers=HOST)
            assert (status, body, headers["cache-status"]) == (200, b"hello", "sluicegate; hit")
        assert origin.count() == len(PATHS)
        if redis_set.__class__.__name__ == "ClusterSet":
            holders = {redis_set.master_of(f"sluicegate:cache:r:shop.example{p}") for p in PATHS}
            assert len(holders) > 1  # the purge below has more than one master to reach

        # By prefix: a SCAN on every master of a cluster.
        status, _, body = second.admin(
            "POST", "/cache/purge", body=b'{"prefix": "http://shop.example/item/"}'
        )
        assert (status, body) == (200, b'{"purged": %d}' % len(PATHS))
        # (The store is committed just after the client has the body: all of one daemon,
        # then all of the other.)
        for path in PATHS:
            assert first.get(path, headers=HOST)[1]["cache-status"].startswith(
                "sluicegate; fwd=uri-miss"
            )
        for path in PATHS:
            assert second.get(path, headers=HOST)[1]["cache-status"] == "sluicegate; hit"
        assert origin.count() == 2 * len(PATHS)  # gone for both; stored again once


def test_the_stampede_lock_spans_daemons(start_sluicegate, redis_set):
    origin = Origin(fresh_for(60, b"slow"), delay=0.5)
    with RawUpstream(origin) as upstream:
        daemons = _start_two(start_sluicegate, upstream, redis_set)
        for n, daemon in enumerate(daemons):  # clients connected, lock subscriptions on
            daemon.get(f"/warm/{n}", headers=HOST)
        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(lambda i: daemons[i % 2].get("/cold", headers=HOST), range(50)))
        assert all(status == 200 and body == b"slow" for status, _, body in results)
        assert origin.count(b"/cold") == 1


def test_a_master_killed_mid_way_makes_misses_not_errors(start_sluicegate, redis_set):
    origin = Origin(fresh_for(60))
    with RawUpstream(origin) as upstream:
        first, second = _start_two(start_sluicegate, upstream, redis_set, lock_timeout="2s")
        assert first.get("/before", headers=HOST)[1]["cache-status"].endswith("stored")
        assert second.get("/before", headers=HOST)[1]["cache-status"] == "sluicegate; hit"
        if redis_set.__class__.__name__ == "ClusterSet":
            old = redis_set.master_of("sluicegate:cache:r:shop.example/before")
            redis_set.kill(old)
        else:
            old = redis_set.kill_master()
        # Until a replica takes over: every answer is the origin's, each in bounded time.
        slowest = 0.0
        for n in range(10):
            for daemon in (first, second):
                started = time.monotonic()
                status, headers, body = daemon.get("/before", headers=HOST)
                slowest = max(slowest, time.monotonic() - started)
                assert (status, body) == (200, b"hello"), (n, status, body)
                assert "cache-status" in headers
        # A lookup, the lock and a store: each bounded by 2 x redis.timeout, plus room for
        # a loaded machine. (The origin answers at once.)
        assert slowest < 3 * 2 * TIMEOUT + 1.0, slowest
        redis_set.wait_failover(old)

        def shared_again() -> bool:
            first.get("/after", headers=HOST)
            return second.get("/after", headers=HOST)[1]["cache-status"] == "sluicegate; hit"

        wait_for(shared_again, timeout=20, message="the cache shared again after the failover")
        assert "Traceback" not in first.logs() + second.logs()
