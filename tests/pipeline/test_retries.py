"""Failed tries and what follows them: the next server, a held failed answer, or none."""

from __future__ import annotations

import json

import pytest

from tests.pipeline.conftest import base_config
from tests.pipeline.upstreams import answer_ok

TOKEN = "pipeline-admin-token"


async def reset_after_request(request, conn):
    await request.complete()
    conn.reset()


async def test_connect_refused_is_retried_on_the_next_server(make_proxy, monkeypatch):
    monkeypatch.setenv("PIPELINE_TOKEN", TOKEN)
    config = base_config()
    config["admin"] = {"token_env": "PIPELINE_TOKEN"}
    proxy = make_proxy(config)
    proxy.upstream("app", 0).refuse = True

    response = await proxy.get("/x", headers=[("X-Sluicegate-Trace", TOKEN)])

    assert (response.status, response.body) == (200, b"app[1] GET /x")
    assert proxy.upstream("app", 0).connects == 1
    assert proxy.upstream("app", 1).requests[0].header("X-Sluicegate-Trace") is None
    trace = json.loads(response.header("X-Sluicegate-Trace"))
    assert trace["retries"] == ["error"]
    assert [(a["server"], a["outcome"]) for a in trace["attempts"]] == [
        ("10.9.0.1:80", "error"),
        ("10.9.0.2:80", 200),
    ]
    assert proxy.server("app", 0).failures == 1 and proxy.server("app", 0).errors == 1
    assert proxy.server("app", 1).requests == 1
    assert proxy.metric("sluicegate_retries_total", upstream="app", reason="error") == 1
    record = await proxy.record()
    assert (record["status"], record["tries"], record["server"]) == (200, 2, "10.9.0.2:80")
    assert [a["outcome"] for a in record["attempts"]] == ["error", 200]


async def test_listed_502_is_held_and_the_next_server_answers(make_proxy):
    proxy = make_proxy(base_config(retry={"on": ["error", "timeout", "http_502"], "budget": 1.0}))
    proxy.script("app", lambda request, conn: conn.respond(502, b"bad one"), index=0)

    response = await proxy.get("/held")

    assert (response.status, response.body) == (200, b"app[1] GET /held")
    assert proxy.metric("sluicegate_retries_total", upstream="app", reason="http_502") == 1
    record = await proxy.record()
    assert [a["outcome"] for a in record["attempts"]] == [502, 200]
    # The held answer was read in full: its connection went back to the pool.
    assert proxy.server("app", 0).pool.idle_count == 1


async def test_held_502_is_the_answer_when_no_other_server_does_better(make_proxy):
    proxy = make_proxy(base_config(retry={"on": ["error", "timeout", "http_502"], "budget": 1.0}))
    proxy.script(
        "app",
        lambda request, conn: conn.respond(502, b"bad one", [("X-From", "zero")]),
        index=0,
    )
    proxy.upstream("app", 1).refuse = True

    response = await proxy.get("/held")

    assert (response.status, response.body) == (502, b"bad one")
    assert response.header("X-From") == "zero"
    record = await proxy.record()
    assert (record["status"], record["tries"]) == (502, 2)
    assert [a["outcome"] for a in record["attempts"]] == [502, "error"]


async def test_502_not_listed_is_relayed_at_once(make_proxy):
    proxy = make_proxy(base_config())
    proxy.script("app", lambda request, conn: conn.respond(502, b"bad one"), index=0)

    response = await proxy.get("/")

    assert (response.status, response.body) == (502, b"bad one")
    assert proxy.upstream("app", 1).requests == []


async def test_idle_close_race_is_retried_once_on_a_fresh_connection(make_proxy):
    proxy = make_proxy(base_config(servers=[{"url": "http://10.9.0.1:80"}]))

    async def close_when_reused(request, conn):
        # The upstream's idle timeout closed a pooled connection just as a request came.
        if len(conn.requests) > 1:
            conn.close()
            return
        await answer_ok(request, conn)

    upstream = proxy.script("app", close_when_reused)
    client = proxy.connect()
    client.request("GET", "/one")
    assert (await client.response()).status == 200
    client.request("GET", "/two")
    second = await client.response()

    assert (second.status, second.body) == (200, b"app[0] GET /two")
    assert upstream.connects == 2
    assert [len(conn.requests) for conn in upstream.connections] == [2, 1]
    record = await proxy.record(2)
    assert (record["status"], record["tries"]) == (200, 1)
    assert proxy.server("app").failures == 0  # a known race, not the server's fault
    assert proxy.metric("sluicegate_retries_total", upstream="app", reason="error") == 0


async def test_idle_close_race_twice_in_a_row_is_a_502(make_proxy):
    proxy = make_proxy(base_config(servers=[{"url": "http://10.9.0.1:80"}]))

    async def close_after_first(request, conn):
        if conn.index > 0 or len(conn.requests) > 1:
            conn.close()
            return
        await answer_ok(request, conn)

    upstream = proxy.script("app", close_after_first)
    client = proxy.connect()
    client.request("GET", "/one")
    assert (await client.response()).status == 200
    client.request("GET", "/two")

    assert (await client.response()).status == 502
    assert upstream.connects == 2  # the fresh connection once, not again


async def test_post_is_not_retried_after_its_request_went_out(make_proxy):
    proxy = make_proxy(base_config())
    proxy.script("app", reset_after_request, index=0)
    client = proxy.connect()
    client.request("POST", "/order", body=b"one pizza")

    response = await client.response()

    assert response.status == 502
    assert proxy.upstream("app", 0).requests[0].body == b"one pizza"
    assert proxy.upstream("app", 1).requests == []
    record = await proxy.record()
    assert (record["status"], record["tries"]) == (502, 1)


@pytest.mark.parametrize(
    ("method", "headers", "retry_on"),
    [
        ("PUT", [], ["error"]),
        ("POST", [("Idempotency-Key", "k-1")], ["error", "idempotency_key"]),
        ("POST", [], ["error", "non_idempotent"]),
    ],
)
async def test_repeatable_requests_are_retried_with_their_body(
    make_proxy, method, headers, retry_on
):
    proxy = make_proxy(base_config(retry={"on": retry_on, "budget": 1.0}))
    proxy.script("app", reset_after_request, index=0)
    client = proxy.connect()
    client.request(method, "/order", headers=headers, body=b"one pizza")

    response = await client.response()

    assert (response.status, response.body) == (200, f"app[1] {method} /order".encode())
    assert proxy.upstream("app", 1).requests[0].body == b"one pizza"


async def test_post_with_idempotency_key_not_retried_unless_configured(make_proxy):
    proxy = make_proxy(base_config())
    proxy.script("app", reset_after_request, index=0)
    client = proxy.connect()
    client.request("POST", "/order", headers=[("Idempotency-Key", "k-1")], body=b"x")

    assert (await client.response()).status == 502
    assert proxy.upstream("app", 1).requests == []
