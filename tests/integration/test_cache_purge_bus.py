"""Purges that reach every daemon's memory store through Redis pub/sub (``purgebus.py``).

Two real daemons with ``cache.store: memory`` and a real Redis (single, Sentinel,
Cluster): each caches the same responses in its own store; a purge on one (the admin's,
or an unsafe method's invalidation) empties the other's too, and with Redis gone a purge
still purges where it was asked.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis
import redis.asyncio

from proxy.cache.purgebus import CHANNEL, Purge, PurgeBus
from tests.integration.test_cache_e2e import Origin, cached_config
from tests.support.daemon import http_request, wait_for
from tests.support.rawupstream import RawUpstream
from tests.support.redis_server import PASSWORD_ENV

HOST = {"Host": "shop.example"}
MISS = "sluicegate; fwd=uri-miss"


def tagged(request):
    """The README's recipe: a user's pages carry ``Cache-Tag: user-<id>``; an update
    (POST) answers 200 and is not stored."""
    if request.method == b"POST":
        return b"200 OK", [b"Cache-Control: no-store"], b"updated"
    tag = b"user-42" if request.target.startswith(b"/users/42") else b"other"
    return b"200 OK", [b"Cache-Control: max-age=60", b"Cache-Tag: " + tag], b"page"


def objects(daemon) -> int:
    return daemon.status()["routes"][0]["cache"]["objects"]


def purged(daemon, by: str) -> float:
    prefix = f'sluicegate_cache_purged_total{{by="{by}"}} '
    for line in daemon.metrics().splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def subscribers(ports, password=None) -> int:
    """How many processes listen on the purge channel (summed over ``ports``)."""
    total = 0
    for port in ports:
        client = redis.Redis(port=port, password=password, socket_timeout=2)
        try:
            total += dict(client.pubsub_numsub(CHANNEL)).get(CHANNEL.encode(), 0)
        finally:
            client.close()
    return total


def start_two(start_sluicegate, upstream, redis_section, env=None):
    config = cached_config(upstream)
    config["redis"] = redis_section
    assert config["cache"].get("store", "memory") == "memory"
    return (
        start_sluicegate(config, name="a", env=env),
        start_sluicegate(config, name="b", env=env),
    )


def cache_on_both(a, b, paths):
    for daemon in (a, b):
        for path in paths:
            assert daemon.get(path, headers=HOST)[1]["cache-status"] == MISS + "; stored"
        for path in paths:
            assert daemon.get(path, headers=HOST)[1]["cache-status"] == "sluicegate; hit"


PURGES = {
    "tag": {"tag": "user-42"},
    "prefix": {"prefix": "http://shop.example/users/42"},
    "url": {"url": "http://shop.example/users/42"},
}


@pytest.mark.parametrize("by", PURGES)
def test_a_purge_on_one_daemon_empties_the_other_daemons_memory_store(
    start_sluicegate, redis_server, by
):
    with RawUpstream(Origin(tagged)) as upstream:
        a, b = start_two(start_sluicegate, upstream, {"url": redis_server.url, "timeout": "200ms"})
        cache_on_both(a, b, ["/users/42", "/users/7"])
        wait_for(lambda: subscribers([redis_server.port]) == 2, message="both subscribed")

        status, _, body = a.admin("POST", "/cache/purge", body=json.dumps(PURGES[by]).encode())
        assert (status, json.loads(body)) == (200, {"purged": 1})  # A's own store

        wait_for(lambda: objects(b) == 1, message="B's entry purged")
        assert b.get("/users/42", headers=HOST)[1]["cache-status"] == MISS + "; stored"
        assert b.get("/users/7", headers=HOST)[1]["cache-status"] == "sluicegate; hit"
        assert a.get("/users/42", headers=HOST)[1]["cache-status"] == MISS + "; stored"
        # Each counted what it purged, once: A did not apply its own message again.
        assert purged(a, by) == 1 and purged(b, by) == 1


def test_an_unsafe_method_through_one_daemon_invalidates_the_other(start_sluicegate, redis_server):
    with RawUpstream(Origin(tagged)) as upstream:
        a, b = start_two(start_sluicegate, upstream, {"url": redis_server.url, "timeout": "200ms"})
        cache_on_both(a, b, ["/users/42", "/users/7"])
        wait_for(lambda: subscribers([redis_server.port]) == 2, message="both subscribed")

        status, _, body = http_request(a.port, "POST", "/users/42", headers=HOST, body=b"x")
        assert (status, body) == (200, b"updated")

        wait_for(lambda: objects(b) == 1, message="B's entry invalidated")
        assert b.get("/users/42", headers=HOST)[1]["cache-status"] == MISS + "; stored"
        assert b.get("/users/7", headers=HOST)[1]["cache-status"] == "sluicegate; hit"
        assert purged(a, "invalidation") == 1 and purged(b, "invalidation") == 1


def test_with_redis_gone_a_purge_still_purges_where_it_was_asked(start_sluicegate, redis_server):
    with RawUpstream(Origin(tagged)) as upstream:
        a, b = start_two(start_sluicegate, upstream, {"url": redis_server.url, "timeout": "200ms"})
        cache_on_both(a, b, ["/users/42", "/users/7"])
        wait_for(lambda: subscribers([redis_server.port]) == 2, message="both subscribed")
        redis_server.stop()

        for path in ("/users/42", "/users/7"):
            purge = json.dumps({"url": "http://shop.example" + path}).encode()
            status, _, body = a.admin("POST", "/cache/purge", body=purge)
            assert (status, body) == (200, b'{"purged": 1}')
            assert a.get(path, headers=HOST)[1]["cache-status"] == MISS + "; stored"
        # B never heard: it keeps serving what it had (and says nothing is wrong).
        assert b.get("/users/42", headers=HOST)[1]["cache-status"] == "sluicegate; hit"
        lost = [line for line in a.log_lines() if "local only" in line.get("message", "")]
        assert len(lost) == 1  # logged once, not once per purge

        # Redis back: both subscribe again, and purges reach B again.
        redis_server.start()
        wait_for(lambda: subscribers([redis_server.port]) == 2, message="subscribed again")
        status, _, body = a.admin("POST", "/cache/purge", body=b'{"tag": "user-42"}')
        assert (status, body) == (200, b'{"purged": 1}')
        wait_for(lambda: b.get("/users/42", headers=HOST)[1]["cache-status"].startswith(MISS))


def test_a_frozen_redis_delays_a_purge_one_deadline_and_an_invalidation_not_at_all(
    start_sluicegate, redis_server
):
    with RawUpstream(Origin(tagged)) as upstream:
        # A read timeout of 3 s (a call deadline of 6 s): long enough to tell waiting for
        # it from not waiting.
        a, b = start_two(start_sluicegate, upstream, {"url": redis_server.url, "timeout": "3s"})
        cache_on_both(a, b, ["/users/42", "/users/7"])
        wait_for(lambda: subscribers([redis_server.port]) == 2, message="both subscribed")
        redis_server.freeze()

        started = time.monotonic()
        status, _, body = http_request(a.port, "POST", "/users/42", headers=HOST, body=b"x")
        assert (status, body) == (200, b"updated")
        assert time.monotonic() - started < 1.5  # published in the background
        assert a.get("/users/42", headers=HOST)[1]["cache-status"] == MISS + "; stored"

        started = time.monotonic()
        status, _, body = a.admin("POST", "/cache/purge", body=b'{"tag": "other"}', timeout=20)
        assert (status, body) == (200, b'{"purged": 1}')
        assert time.monotonic() - started < 10  # one read timeout (3 s) or deadline at most
        assert a.get("/users/7", headers=HOST)[1]["cache-status"] == MISS + "; stored"


def test_an_invalidation_through_one_worker_reaches_its_sibling_and_other_daemons(
    start_sluicegate, redis_server
):
    with RawUpstream(Origin(tagged)) as upstream:
        config = cached_config(upstream)
        config["redis"] = {"url": redis_server.url, "timeout": "200ms"}
        a = start_sluicegate({**config, "workers": 2}, name="a", timeout=30)
        b = start_sluicegate(config, name="b")
        for _ in range(40):  # connections spread over the workers: until both hold a copy
            a.get("/users/42", headers=HOST)
            if objects(a) == 2:
                break
        assert objects(a) == 2
        b.get("/users/42", headers=HOST)
        wait_for(lambda: subscribers([redis_server.port]) == 3, message="every worker subscribed")

        assert http_request(a.port, "POST", "/users/42", headers=HOST, body=b"x")[0] == 200
        # One worker invalidated its own store; its sibling and B heard it.
        wait_for(lambda: objects(a) == 0, message="both of A's workers invalidated")
        wait_for(lambda: objects(b) == 0, message="B invalidated")
        assert purged(a, "invalidation") == 2


def test_a_purge_on_a_daemon_with_workers_answers_what_all_its_workers_removed(
    start_sluicegate, redis_server
):
    """The supervisor asks each worker and adds up; a worker that heard its sibling's
    message first would answer 0 (seen 4 times in 15 before workers ignored it)."""
    with RawUpstream(Origin(tagged)) as upstream:
        config = cached_config(upstream)
        config["redis"] = {"url": redis_server.url, "timeout": "200ms"}
        a = start_sluicegate({**config, "workers": 2}, name="a", timeout=30)
        b = start_sluicegate(config, name="b")
        wait_for(lambda: subscribers([redis_server.port]) == 3, message="every worker subscribed")
        answers = []
        for _ in range(10):
            for _ in range(40):  # connections spread over the workers: until both hold it
                a.get("/users/42", headers=HOST)
                if objects(a) == 2:
                    break
            assert objects(a) == 2
            b.get("/users/42", headers=HOST)
            body = a.admin("POST", "/cache/purge", body=b'{"tag": "user-42"}')[2]
            answers.append(json.loads(body)["purged"])
            wait_for(lambda: objects(b) == 0, message="B purged too")
        assert answers == [2] * 10
        assert purged(a, "tag") == 20 and purged(b, "tag") == 10


def subscriptions(server) -> set[int]:
    """Redis's ids of the connections subscribed to a channel."""
    with server.client() as client:
        return {c["id"] for c in client.client_list() if c.get("sub") == "1"}


def test_a_reload_keeps_the_memory_store_and_moves_its_bus_to_the_new_redis_section(
    start_sluicegate, redis_server
):
    with RawUpstream(Origin(tagged)) as upstream:
        a, b = start_two(start_sluicegate, upstream, {"url": redis_server.url, "timeout": "200ms"})
        cache_on_both(a, b, ["/users/42", "/users/7"])
        wait_for(lambda: len(subscriptions(redis_server)) == 2, message="both subscribed")
        before = subscriptions(redis_server)

        unchanged = dict(b.config)  # the same sections: the same bus, no new subscription
        b.write_config(unchanged)
        assert b.admin("POST", "/reload")[0] == 200
        assert subscriptions(redis_server) == before

        changed = {**b.config, "redis": {"url": redis_server.url, "timeout": "300ms"}}
        b.write_config(changed)
        assert b.admin("POST", "/reload")[0] == 200
        # B's old subscription closed, a new one open; A's unchanged.
        wait_for(
            lambda: (lambda now: len(now) == 2 and len(now & before) == 1)(
                subscriptions(redis_server)
            ),
            message="B subscribed anew, its old subscription closed",
        )
        assert b.get("/users/42", headers=HOST)[1]["cache-status"] == "sluicegate; hit"

        assert a.admin("POST", "/cache/purge", body=b'{"tag": "user-42"}')[0] == 200
        wait_for(lambda: objects(b) == 1, message="B's entry purged through its new bus")
        assert purged(b, "tag") == 1


@pytest.fixture(params=["sentinel", "cluster"])
def redis_set(request):
    return request.getfixturevalue(f"redis_{request.param}")


def test_purges_reach_the_other_daemon_through_sentinel_and_cluster(start_sluicegate, redis_set):
    with RawUpstream(Origin(tagged)) as upstream:
        section = redis_set.redis_config(timeout="250ms")
        env = {PASSWORD_ENV: redis_set.password}
        a, b = start_two(start_sluicegate, upstream, section, env=env)
        cache_on_both(a, b, ["/users/42", "/users/7"])
        ports = redis_set.masters() if hasattr(redis_set, "masters") else [redis_set.master_port()]
        wait_for(lambda: subscribers(ports, redis_set.password) == 2, message="both subscribed")

        status, _, body = b.admin("POST", "/cache/purge", body=b'{"tag": "user-42"}')
        assert (status, body) == (200, b'{"purged": 1}')
        wait_for(lambda: objects(a) == 1, message="A's entry purged")
        assert a.get("/users/42", headers=HOST)[1]["cache-status"] == MISS + "; stored"
        assert a.get("/users/7", headers=HOST)[1]["cache-status"] == "sluicegate; hit"


async def test_the_bus_ignores_its_own_and_malformed_messages(redis_server):
    heard: dict[str, list[Purge]] = {"first": [], "second": []}

    def bus(name):
        async def apply(purge):
            heard[name].append(purge)

        client = redis.asyncio.from_url(redis_server.url)
        return PurgeBus(client, redis.asyncio.from_url(redis_server.url), apply, deadline=1)

    first, second = bus("first"), bus("second")
    first.start()
    second.start()
    try:
        await asyncio.wait_for(first.subscribed.wait(), 5)
        await asyncio.wait_for(second.subscribed.wait(), 5)
        await first.client.publish(CHANNEL, b"not json")
        await first.client.publish(
            CHANNEL, b'{"from": "x", "instance": "x", "by": "everything", "values": []}'
        )
        await first.publish(Purge("tag", ("user-42",)))
        await second.publish(Purge("invalidation", ("shop.example/a", "shop.example/b")))
        for _ in range(100):
            if heard["first"] and heard["second"]:
                break
            await asyncio.sleep(0.02)
        assert heard == {
            "first": [Purge("invalidation", ("shop.example/a", "shop.example/b"))],
            "second": [Purge("tag", ("user-42",))],
        }
    finally:
        first.stop()
        second.stop()
        for one in (first, second):
            await one.client.aclose()
            await one.subscriber.aclose()
