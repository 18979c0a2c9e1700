"""Bodies on the move: streamed both ways under backpressure, interim heads, HEAD, a
client that leaves half-way, and a switched-protocol tunnel."""

from __future__ import annotations

import asyncio

from tests.pipeline.conftest import base_config
from tests.pipeline.upstreams import LAST_CHUNK, chunk, response_bytes

ONE_SERVER = [{"url": "http://10.9.0.1:80"}]


def one_server(**extra):
    return base_config(servers=ONE_SERVER, **extra)


async def test_head_response_relayed_without_a_body(make_proxy):
    proxy = make_proxy(one_server())

    def answer(request, conn):
        if request.method == "HEAD":  # the length a GET would have, and no body
            conn.write(response_bytes(200, headers=[("Content-Length", "42")]))
        else:
            conn.respond(200, b"next")

    upstream = proxy.script("app", answer)
    client = proxy.connect()
    client.request("HEAD", "/file")
    client.request("GET", "/after")

    head = await client.response()
    after = await client.response()

    assert (head.status, head.header("Content-Length"), head.body) == (200, "42", b"")
    assert upstream.requests[0].method == "HEAD"
    assert (after.status, after.body) == (200, b"next")
    assert upstream.connects == 1  # the HEAD answer left the connection reusable


async def test_interim_responses_relayed_before_the_final_one(make_proxy):
    proxy = make_proxy(one_server())

    async def early_hints(request, conn):
        conn.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        await asyncio.sleep(1)
        conn.respond(200, b"page")

    proxy.script("app", early_hints)
    client = proxy.connect()
    client.request("GET", "/")

    await client.received_bytes(b"103 Early Hints")
    assert b"200" not in client.received  # the hint went out on its own, before the answer
    response = await client.response()

    assert [(r.status, r.header("Link")) for r in response.interim] == [
        (103, "</style.css>; rel=preload")
    ]
    assert (response.status, response.body) == (200, b"page")


async def test_expect_100_continue_answered_by_the_proxy(make_proxy):
    proxy = make_proxy(one_server())
    upstream = proxy.upstream("app")
    client = proxy.connect()
    client.expect("POST")
    client.send(
        b"POST /upload HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    )

    await client.received_bytes(b"HTTP/1.1 100 Continue\r\n\r\n")
    client.send(b"hello")
    response = await client.response()

    assert (response.status, response.body) == (200, b"app[0] POST /upload")
    assert [r.status for r in response.interim] == [100]
    seen = upstream.requests[0]
    assert seen.body == b"hello"
    assert seen.header("Expect") is None  # the proxy answered it: not passed on


async def test_chunked_upload_streamed_to_the_upstream(make_proxy):
    proxy = make_proxy(one_server())
    upstream = proxy.upstream("app")
    client = proxy.connect()
    client.expect("POST")
    client.send(b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.send(chunk(b"first "))
    await asyncio.sleep(1)
    await proxy.settle()

    # The upstream has the head and the first piece while the rest is still to come.
    [seen] = upstream.requests
    assert seen.body == b"first " and not seen.done
    client.send(chunk(b"second") + LAST_CHUNK)
    response = await client.response()

    assert response.status == 200
    assert seen.body == b"first second" and seen.done


async def test_large_response_streams_under_backpressure(make_proxy):
    proxy = make_proxy(one_server())
    piece = b"z" * 64 * 1024
    pieces = 64  # 4 MiB: far past every buffer on the way
    progress = {"sent": 0}

    async def big(request, conn):
        conn.write(response_bytes(200, headers=[("Content-Length", str(len(piece) * pieces))]))
        for _ in range(pieces):
            while conn.transport.writing_paused:
                await asyncio.sleep(0.01)
            conn.write(piece)
            progress["sent"] += 1

    upstream = proxy.script("app", big)
    client = proxy.connect()
    client.stop_reading()
    client.request("GET", "/big")
    await asyncio.sleep(5)
    await proxy.settle()

    # A client that does not read holds the upstream back: only buffers' worth got out.
    assert progress["sent"] < pieces // 2
    server_end = upstream.connections[0].transport
    assert server_end.times_paused >= 1 and server_end.writing_paused
    client.start_reading()
    response = await client.response()

    assert response.status == 200
    assert response.body == piece * pieces
    assert progress["sent"] == pieces


async def test_client_gone_mid_response_closes_the_upstream_connection(make_proxy):
    proxy = make_proxy(one_server())

    async def slow_body(request, conn):
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nstart")
        await asyncio.get_running_loop().create_future()

    upstream = proxy.script("app", slow_body)
    client = proxy.connect()
    client.request("GET", "/")
    await client.received_bytes(b"start")

    client.reset()
    record = await proxy.record()

    await proxy.settle()
    assert upstream.connections[0].closed  # half a response: never back in the pool
    assert proxy.server("app").pool.idle_count == 0
    assert record["status"] == 499
    assert record["bytes_out"] > 0


async def test_client_gone_before_the_answer_is_a_499(make_proxy):
    proxy = make_proxy(one_server())

    async def later(request, conn):
        await asyncio.sleep(3)
        conn.respond(200, b"too late")

    upstream = proxy.script("app", later)
    client = proxy.connect()
    client.request("GET", "/")
    await asyncio.sleep(1)
    client.reset()

    record = await proxy.record()

    assert record["status"] == 499
    assert record["error"] == "client went away"
    await proxy.settle()
    assert upstream.connections[0].closed  # at once, not when the answer would have come
    assert proxy.now() < 3


async def test_half_closed_client_still_gets_its_answer(make_proxy):
    proxy = make_proxy(one_server())

    async def later(request, conn):
        await asyncio.sleep(3)
        conn.respond(200, b"worth the wait")

    proxy.script("app", later)
    client = proxy.connect()
    client.request("GET", "/")
    client.transport.write_eof()  # as curl does after an upload

    response = await client.response()

    assert (response.status, response.body) == (200, b"worth the wait")
    await client.closed()  # then the proxy closes: nothing more can come


async def test_upgrade_tunnel_carries_bytes_both_ways(make_proxy):
    proxy = make_proxy(one_server())

    async def websocket(request, conn):
        assert request.header("Upgrade") == "websocket"
        conn.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            b"server-hello"
        )
        ping = await conn.tunnel_bytes(4)
        conn.write(b"pong:" + ping)
        await conn.tunnel_bytes(3)  # "bye": the server ends the tunnel
        conn.close()

    upstream = proxy.script("app", websocket)
    client = proxy.connect()
    client.expect("GET")
    client.send(
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )

    response = await client.response()
    assert response.status == 101
    assert await client.tunnel_bytes(12) == b"server-hello"
    client.send(b"ping")
    assert await client.tunnel_bytes(9) == b"pong:ping"
    client.send(b"bye")
    await client.closed()

    seen = upstream.requests[0]
    assert seen.header("Upgrade") == "websocket"
    assert seen.header("Connection").lower() == "upgrade"
    assert upstream.connections[0].closed
    record = await proxy.record()
    assert record["status"] == 101


async def test_idle_tunnel_ends_after_the_read_timeout(make_proxy):
    proxy = make_proxy(one_server(timeouts={"read": 20}))

    def switch(request, conn):
        conn.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n")

    proxy.script("app", switch)
    client = proxy.connect()
    client.expect("GET")
    client.send(b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n")
    assert (await client.response()).status == 101
    opened = proxy.now()
    await asyncio.sleep(15)
    client.send(b"still here")  # activity from the client keeps it open
    await client.closed()

    assert proxy.now() - opened >= 15 + 20 - 0.06
