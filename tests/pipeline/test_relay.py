"""Plain relaying: a GET answered, the upstream connection kept for the next request."""

from __future__ import annotations

from tests.pipeline.conftest import base_config


async def test_get_relayed_and_upstream_connection_reused(make_proxy):
    proxy = make_proxy(base_config(servers=[{"url": "http://10.9.0.1:80"}]))
    client = proxy.connect()
    client.request("GET", "/a?x=1", headers=[("X-Test", "yes")])
    first = await client.response()
    client.request("GET", "/b")
    second = await client.response()

    assert (first.status, first.body) == (200, b"app[0] GET /a?x=1")
    assert (second.status, second.body) == (200, b"app[0] GET /b")
    upstream = proxy.upstream("app")
    assert upstream.connects == 1  # the second request went on the pooled connection
    assert [r.target for r in upstream.connections[0].requests] == ["/a?x=1", "/b"]
    seen = upstream.requests[0]
    assert seen.header("X-Test") == "yes"
    assert seen.header("X-Forwarded-For") == "10.1.2.3"
    assert seen.header("X-Request-Id") == first.header("X-Request-Id")
    assert not client.lost
    server = proxy.server("app")
    assert server.requests == 2 and server.failures == 0
    assert proxy.metric("sluicegate_requests_total", route="main", method="GET", status="200") == 2
    record = await proxy.record(2)
    assert (record["route"], record["status"], record["tries"]) == ("main", 200, 1)
    assert record["server"] == "10.9.0.1:80"
