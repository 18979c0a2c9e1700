"""Route and upstream policies in process: rate limit, circuit breaker, slow start,
response cache and compression, with their clocks on the loop's virtual one."""

from __future__ import annotations

import asyncio
import gzip

from proxy.balancing.breaker import BreakerState
from tests.pipeline.conftest import base_config

ONE_SERVER = [{"url": "http://10.9.0.1:80"}]


async def test_rate_limit_429_until_the_bucket_refills(make_proxy):
    config = base_config(servers=ONE_SERVER)
    config["routes"][0]["rate_limit"] = {"rate": "1/s", "burst": 2}
    proxy = make_proxy(config)
    client = proxy.connect()

    statuses = []
    for _ in range(3):
        client.request("GET", "/")
        statuses.append(await client.response())

    assert [r.status for r in statuses] == [200, 200, 429]
    assert statuses[2].header("Retry-After") == "1"
    assert len(proxy.upstream("app").requests) == 2  # the refused one never left
    await asyncio.sleep(0.5)
    client.request("GET", "/")
    assert (await client.response()).status == 429  # half a token is not one
    await asyncio.sleep(0.5)
    client.request("GET", "/")
    assert (await client.response()).status == 200

    assert proxy.metric("sluicegate_rate_limited_total", route="main") == 2
    assert proxy.runtime.route_counters["main"].rate_limited == 2
    record = await proxy.record(3)
    assert (record["status"], record["rate_limited"]) == (429, True)


async def test_breaker_opens_after_failures_and_half_opens_after_open_duration(make_proxy):
    proxy = make_proxy(base_config(circuit_breaker={"failure_threshold": 2, "open_duration": 10}))
    failing = proxy.upstream("app", 0)
    failing.refuse = True
    breaker = proxy.server("app", 0).breaker
    client = proxy.connect()

    while failing.connects < 2:
        client.request("GET", "/")
        assert (await client.response()).status == 200  # retried on the other server
    assert breaker.state is BreakerState.OPEN
    opened = proxy.now()
    assert (
        proxy.metric(
            "sluicegate_circuit_breaker_transitions_total",
            upstream="app",
            server="10.9.0.1:80",
            to="open",
        )
        == 1
    )

    for _ in range(4):  # open: the server is skipped without a try
        client.request("GET", "/")
        assert (await client.response()).body == b"app[1] GET /"
    assert failing.connects == 2

    await asyncio.sleep(opened + 9.9 - proxy.now())
    assert breaker.state is BreakerState.OPEN
    await asyncio.sleep(0.1)
    assert breaker.state is BreakerState.HALF_OPEN

    failing.refuse = False  # it recovered: the trial request succeeds
    while not failing.requests:
        client.request("GET", "/")
        assert (await client.response()).status == 200
    assert breaker.state is BreakerState.CLOSED
    assert (
        proxy.metric(
            "sluicegate_circuit_breaker_transitions_total",
            upstream="app",
            server="10.9.0.1:80",
            to="closed",
        )
        == 1
    )


async def test_failed_half_open_trial_reopens_for_a_fresh_open_duration(make_proxy):
    proxy = make_proxy(base_config(circuit_breaker={"failure_threshold": 1, "open_duration": 5}))
    failing = proxy.upstream("app", 0)
    failing.refuse = True
    breaker = proxy.server("app", 0).breaker
    client = proxy.connect()

    client.request("GET", "/")
    await client.response()
    assert breaker.state is BreakerState.OPEN
    await asyncio.sleep(5)
    while failing.connects < 2:  # the trial, refused again
        client.request("GET", "/")
        assert (await client.response()).status == 200
    reopened = proxy.now()
    assert breaker.state is BreakerState.OPEN

    await asyncio.sleep(reopened + 4.9 - proxy.now())
    assert breaker.state is BreakerState.OPEN
    await asyncio.sleep(0.1)
    assert breaker.state is BreakerState.HALF_OPEN


async def test_slow_start_ramps_a_recovered_server_on_the_virtual_clock(make_proxy):
    proxy = make_proxy(
        base_config(circuit_breaker={"failure_threshold": 1, "open_duration": 1}, slow_start=100)
    )
    recovering = proxy.upstream("app", 0)
    recovering.refuse = True
    client = proxy.connect()
    client.request("GET", "/")
    await client.response()
    await asyncio.sleep(1)
    recovering.refuse = False
    while not recovering.requests:  # the half-open trial closes the breaker: ramp starts
        client.request("GET", "/")
        await client.response()

    async def requests_to_recovering(count: int) -> int:
        before = len(recovering.requests)
        client = proxy.connect()
        for _ in range(count):
            client.request("GET", "/")
            await client.response()
        return len(recovering.requests) - before

    early = await requests_to_recovering(40)  # at the ramp's start: a small share
    await asyncio.sleep(100)
    late = await requests_to_recovering(40)  # ramp over: its full half

    assert early <= 8
    assert late == 20


def cached_config() -> dict:
    config = base_config(servers=ONE_SERVER)
    config["cache"] = {"store": "memory"}
    config["routes"][0]["cache"] = {}
    return config


async def test_cache_miss_then_hit_from_the_memory_store(make_proxy):
    proxy = make_proxy(cached_config())
    served = {"count": 0}

    def cacheable(request, conn):
        served["count"] += 1
        conn.respond(
            200,
            b"version %d" % served["count"],
            [("Cache-Control", "max-age=60"), ("Content-Type", "text/plain")],
        )

    upstream = proxy.script("app", cacheable)
    client = proxy.connect()
    client.request("GET", "/doc")
    miss = await client.response()
    client.request("GET", "/doc")
    hit = await client.response()
    client.request("GET", "/other")
    other = await client.response()

    assert (miss.status, miss.body) == (200, b"version 1")
    assert "hit" not in miss.header("Cache-Status")
    assert (hit.status, hit.body) == (200, b"version 1")
    assert hit.header("Cache-Status") == "sluicegate; hit"
    assert other.body == b"version 2"
    assert [r.target for r in upstream.requests] == ["/doc", "/other"]
    records = [await proxy.record(n) for n in (1, 2, 3)]
    assert [r["cache"] for r in records] == ["miss", "hit", "miss"]
    assert records[1]["server"] == ""  # answered by the proxy itself
    assert proxy.metric("sluicegate_cache_requests_total", route="main", result="hit") == 1


async def test_cache_does_not_store_a_private_answer(make_proxy):
    proxy = make_proxy(cached_config())
    upstream = proxy.script(
        "app", lambda request, conn: conn.respond(200, b"mine", [("Cache-Control", "private")])
    )
    client = proxy.connect()
    for _ in range(2):
        client.request("GET", "/me")
        assert (await client.response()).body == b"mine"

    assert len(upstream.requests) == 2


def compressed_config(min_size: int = 100) -> dict:
    config = base_config(servers=ONE_SERVER)
    config["routes"][0]["compress"] = {"algorithms": ["gzip"], "min_size": min_size}
    return config


TEXT = b"All work and no play makes Jack a dull boy.\n" * 100


def text_answer(request, conn):
    conn.respond(200, TEXT, [("Content-Type", "text/plain; charset=utf-8")])


async def test_gzip_compression_on_a_compress_route(make_proxy):
    proxy = make_proxy(compressed_config())
    upstream = proxy.script("app", text_answer)
    client = proxy.connect()
    client.request("GET", "/text", headers=[("Accept-Encoding", "gzip, br;q=0")])
    compressed = await client.response()
    client.request("GET", "/text")
    plain = await client.response()

    assert compressed.header("Content-Encoding") == "gzip"
    assert "accept-encoding" in compressed.header("Vary").lower()
    assert len(compressed.body) < len(TEXT) // 5
    assert gzip.decompress(compressed.body) == TEXT
    assert plain.header("Content-Encoding") is None and plain.body == TEXT
    assert len(upstream.requests) == 2
    assert (
        proxy.metric("sluicegate_compressed_responses_total", route="main", algorithm="gzip") == 1
    )


async def test_small_or_already_encoded_answers_are_left_alone(make_proxy):
    proxy = make_proxy(compressed_config(min_size=10_000))
    proxy.script("app", text_answer)
    client = proxy.connect()
    client.request("GET", "/", headers=[("Accept-Encoding", "gzip")])

    response = await client.response()

    assert response.header("Content-Encoding") is None and response.body == TEXT
