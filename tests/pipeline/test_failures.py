"""How each way an exchange can go wrong ends: for the client, the upstream connection,
and the books."""

from __future__ import annotations

import asyncio

from tests.pipeline.conftest import base_config
from tests.pipeline.upstreams import LAST_CHUNK, answer_ok, chunk

ONE_SERVER = [{"url": "http://10.9.0.1:80"}]


def garbage(request, conn):
    conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nBad Header\r\n\r\nhello")


async def test_malformed_response_head_is_a_502_not_retried_unless_listed(make_proxy):
    proxy = make_proxy(base_config())
    proxy.script("app", garbage, index=0)

    response = await proxy.get("/")

    assert response.status == 502
    assert proxy.upstream("app", 1).requests == []
    assert proxy.upstream("app", 0).connections[0].closed
    record = await proxy.record()
    assert record["attempts"][0]["outcome"] == "invalid_header"


async def test_malformed_response_head_retried_when_listed(make_proxy):
    proxy = make_proxy(base_config(retry={"on": ["error", "invalid_header"], "budget": 1.0}))
    proxy.script("app", garbage, index=0)

    response = await proxy.get("/")

    assert (response.status, response.body) == (200, b"app[1] GET /")


async def test_upstream_closing_mid_body_ends_the_client_connection(make_proxy):
    proxy = make_proxy(base_config())

    def cut_short(request, conn):
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        conn.close()

    proxy.script("app", cut_short, index=0)
    client = proxy.connect()
    client.request("GET", "/")

    await client.closed()

    assert client.received.endswith(b"\r\n\r\nonly ten b")  # what came; framing says short
    assert proxy.upstream("app", 1).requests == []  # the response had begun: no retry
    record = await proxy.record()
    assert record["status"] == 200 and "mid-response" in record["error"]


async def test_connection_close_from_the_upstream_is_not_pooled(make_proxy):
    proxy = make_proxy(base_config(servers=ONE_SERVER))
    upstream = proxy.script(
        "app", lambda request, conn: conn.respond(200, b"bye", [("Connection", "close")])
    )
    client = proxy.connect()
    for _ in range(2):
        client.request("GET", "/")
        response = await client.response()
        assert (response.status, response.body) == (200, b"bye")
        assert response.header("Connection") is None  # hop-by-hop: ours to decide

    assert upstream.connects == 2
    assert not client.lost  # the client's connection is its own affair


async def test_chunked_and_close_delimited_bodies_relayed(make_proxy):
    proxy = make_proxy(base_config(servers=ONE_SERVER))

    async def answer(request, conn):
        if request.target == "/chunked":
            conn.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b"one ", b"two ", b"three"):
                conn.write(chunk(piece))
                await asyncio.sleep(0.1)
            conn.write(LAST_CHUNK)
        else:  # HTTP/1.0 style: the body ends with the connection
            conn.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
            await asyncio.sleep(0.1)
            conn.close()

    proxy.script("app", answer)
    client = proxy.connect()
    client.request("GET", "/chunked")
    chunked = await client.response()
    client.request("GET", "/close")
    closed = await client.response()

    assert (chunked.status, chunked.body) == (200, b"one two three")
    assert chunked.chunked
    assert (closed.status, closed.body) == (200, b"until the end")


async def test_no_route_is_a_404_without_an_upstream(make_proxy):
    config = base_config()
    config["routes"][0]["match"] = {"path_prefix": "/api"}
    proxy = make_proxy(config)

    response = await proxy.get("/elsewhere")

    assert response.status == 404
    assert proxy.upstream("app", 0).connects == proxy.upstream("app", 1).connects == 0
    record = await proxy.record()
    assert (record["status"], record["route"]) == (404, "")


async def test_body_too_large_to_hold_is_streamed_and_not_retried(make_proxy):
    proxy = make_proxy(base_config(retry={"max_body_bytes": 1000, "budget": 1.0}))

    async def reset_after_request(request, conn):
        await request.complete()
        conn.reset()

    proxy.script("app", reset_after_request, index=0)
    client = proxy.connect()
    client.request("PUT", "/big", body=b"b" * 5000)

    response = await client.response()

    assert response.status == 502
    assert proxy.upstream("app", 0).requests[0].body == b"b" * 5000
    assert proxy.upstream("app", 1).requests == []  # nothing held to replay


async def test_upload_backpressure_reaches_the_client(make_proxy):
    proxy = make_proxy(base_config(servers=ONE_SERVER))
    released = asyncio.Event()

    def slow_reader(request, conn):
        conn.pause_reading()  # at once, as the head arrives
        return read_when_released(request, conn)

    async def read_when_released(request, conn):
        await released.wait()
        conn.resume_reading()
        await answer_ok(request, conn)

    upstream = proxy.script("app", slow_reader)
    client = proxy.connect()
    client.expect("POST")
    client.send(b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"u" * 32 * 1024
    for _ in range(128):  # 4 MiB
        client.send(chunk(piece))
    client.send(LAST_CHUNK)
    await asyncio.sleep(1)

    proxy_end = client.transport.peer
    assert not proxy_end.reading  # the proxy stopped reading the client
    assert client.transport.get_write_buffer_size() > 2 * 1024 * 1024
    assert len(upstream.requests[0].body) < 64 * 1024  # what came with the head
    released.set()
    response = await client.response()

    assert response.status == 200
    assert upstream.requests[0].body == piece * 128


async def test_pipelined_requests_answered_in_order(make_proxy):
    proxy = make_proxy(base_config(servers=ONE_SERVER))

    async def slow_first(request, conn):
        if request.target == "/1":
            await asyncio.sleep(2)
        await answer_ok(request, conn)

    proxy.script("app", slow_first)
    client = proxy.connect()
    client.expect("GET")
    client.expect("GET")
    client.expect("GET")
    client.send(b"".join(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % n for n in (1, 2, 3)))

    bodies = [(await client.response()).body for _ in range(3)]

    assert bodies == [b"app[0] GET /1", b"app[0] GET /2", b"app[0] GET /3"]


async def test_early_answer_before_the_body_ended_is_not_pooled(make_proxy):
    proxy = make_proxy(base_config(servers=ONE_SERVER))

    def refuse_upload(request, conn):
        if request.method == "POST":
            conn.respond(413, b"too big for me")  # before reading the body
        else:
            conn.respond(200, b"fine")

    upstream = proxy.script("app", refuse_upload)
    client = proxy.connect()
    client.expect("POST")
    client.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
    early = await client.response()

    assert (early.status, early.body) == (413, b"too big for me")
    await proxy.settle()
    assert proxy.server("app").pool.idle_count == 0
    assert upstream.connections[0].closed
