"""Deadlines on the virtual clock: each fires when it should, and not a tick before."""

from __future__ import annotations

import asyncio

import pytest

from tests.pipeline.conftest import base_config
from tests.pipeline.upstreams import answer_ok

ONE_SERVER = [{"url": "http://10.9.0.1:80"}]
# The retry time budget starts on time.monotonic() (proxy/pipeline/exchange.py), which the
# virtual clock does not reach: what real time passes between its start and the try (well
# under this, even on a loaded machine) comes off the budget's end on the loop's clock.
BUDGET_SLACK = 0.1


async def never_answer(request, conn):
    await asyncio.get_running_loop().create_future()


async def test_read_timeout_is_a_504_when_it_runs_out(make_proxy):
    proxy = make_proxy(base_config(servers=ONE_SERVER, timeouts={"read": 5}))
    upstream = proxy.script("app", never_answer)
    client = proxy.connect()
    started = proxy.now()
    client.request("GET", "/slow")

    await asyncio.sleep(4.9)
    assert client.responses == []
    response = await client.response()

    assert response.status == 504
    assert proxy.now() - started == pytest.approx(5.0, abs=0.01)
    await proxy.settle()
    assert upstream.connections[0].closed  # a timed-out connection is never reused
    assert proxy.server("app").timeouts == 1
    record = await proxy.record()
    assert record["status"] == 504 and "timed out" in record["error"]


async def test_read_timeout_between_body_pieces_ends_the_response(make_proxy):
    proxy = make_proxy(base_config(servers=ONE_SERVER, timeouts={"read": 3}))

    async def stall_mid_body(request, conn):
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf!")
        await asyncio.sleep(2)
        conn.write(b"more")  # a gap under the read timeout is fine
        await asyncio.get_running_loop().create_future()

    proxy.script("app", stall_mid_body)
    client = proxy.connect()
    started = proxy.now()
    client.request("GET", "/")

    await client.closed()

    assert proxy.now() - started == pytest.approx(5.0, abs=0.01)
    assert client.received.startswith(b"HTTP/1.1 200")
    assert client.received.endswith(b"half!more")  # what came, then the connection ends


async def test_retry_timeout_bounds_the_exchange_shorter_than_read(make_proxy):
    proxy = make_proxy(base_config(timeouts={"read": 30}, retry={"timeout": 2, "budget": 1.0}))
    proxy.script("app", never_answer, index=0)
    client = proxy.connect()
    started = proxy.now()
    client.request("GET", "/")

    response = await client.response()

    assert response.status == 504
    assert proxy.now() - started == pytest.approx(2.0, abs=BUDGET_SLACK)
    # The budget is spent: no other server is tried.
    assert proxy.upstream("app", 1).connects == 0
    record = await proxy.record()
    assert "retry.timeout" in record["error"]


async def test_retry_timeout_bounds_a_slow_body_too(make_proxy):
    proxy = make_proxy(base_config(servers=ONE_SERVER, timeouts={"read": 30}, retry={"timeout": 2}))

    async def dribble(request, conn):
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        while True:
            await asyncio.sleep(0.5)
            conn.write(b"x")

    proxy.script("app", dribble)
    client = proxy.connect()
    started = proxy.now()
    client.request("GET", "/")

    await client.closed()

    assert proxy.now() - started == pytest.approx(2.0, abs=BUDGET_SLACK)
    assert client.received.endswith(b"\r\n\r\nxxx")  # at 0.5, 1.0, 1.5 s


async def test_connect_timeout_moves_on_to_the_next_server(make_proxy):
    proxy = make_proxy(base_config(timeouts={"connect": 0.5}))
    proxy.upstream("app", 0).hang_connect = True
    started = proxy.now()

    response = await proxy.get("/")

    assert (response.status, response.body) == (200, b"app[1] GET /")
    assert proxy.now() - started == pytest.approx(0.5, abs=0.01)
    assert proxy.metric("sluicegate_retries_total", upstream="app", reason="timeout") == 1


async def test_slow_connect_within_the_connect_timeout_is_fine(make_proxy):
    proxy = make_proxy(base_config(servers=ONE_SERVER, timeouts={"connect": 1}))
    proxy.upstream("app").connect_delay = 0.9
    started = proxy.now()

    response = await proxy.get("/")

    assert response.status == 200
    assert proxy.now() - started == pytest.approx(0.9, abs=0.01)


async def test_client_header_timeout_answers_408(make_proxy):
    config = base_config()
    config["limits"] = {"client_header_timeout": 4}
    proxy = make_proxy(config)
    client = proxy.connect()
    client.send(b"GET / HTTP/1.1\r\nHost: exa")
    started = proxy.now()

    await client.closed()

    # The sweeper meets client deadlines to within one tick (50 ms).
    assert proxy.now() - started == pytest.approx(4.0, abs=0.06)
    assert client.received.startswith(b"HTTP/1.1 408")
    assert proxy.upstream("app", 0).connects == 0


async def test_keepalive_timeout_closes_an_idle_client_connection(make_proxy):
    config = base_config()
    config["limits"] = {"keepalive_timeout": 10}
    proxy = make_proxy(config)
    client = proxy.connect()
    client.request("GET", "/")
    await client.response()
    answered = proxy.now()

    await asyncio.sleep(9.8)
    assert not client.lost
    await client.closed()

    assert proxy.now() - answered == pytest.approx(10.0, abs=0.06)
    assert client.received.count(b"HTTP/1.1") == 1  # closed without a word


async def test_pooled_upstream_connection_closed_after_its_idle_time(make_proxy):
    proxy = make_proxy(base_config(servers=ONE_SERVER))
    upstream = proxy.script("app", answer_ok)
    assert (await proxy.get("/")).status == 200
    await proxy.settle()
    assert proxy.server("app").pool.idle_count == 1

    await asyncio.sleep(61)

    assert proxy.server("app").pool.idle_count == 0
    assert upstream.connections[0].closed


async def test_read_timeout_retried_on_the_next_server(make_proxy):
    proxy = make_proxy(base_config(timeouts={"read": 2}))
    proxy.script("app", never_answer, index=0)
    started = proxy.now()

    response = await proxy.get("/")

    assert (response.status, response.body) == (200, b"app[1] GET /")
    assert proxy.now() - started == pytest.approx(2.0, abs=0.01)
    assert proxy.metric("sluicegate_retries_total", upstream="app", reason="timeout") == 1
    record = await proxy.record()
    assert [a["outcome"] for a in record["attempts"]] == ["timeout", 200]


async def test_client_body_timeout_answers_408(make_proxy):
    config = base_config(servers=ONE_SERVER)
    config["limits"] = {"client_body_timeout": 6}
    proxy = make_proxy(config)
    client = proxy.connect()
    client.expect("POST")
    client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nonly part")
    started = proxy.now()

    await client.closed()

    assert proxy.now() - started == pytest.approx(6.0, abs=0.06)
    assert client.received.startswith(b"HTTP/1.1 408")
