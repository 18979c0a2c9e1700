"""Forwarding rules and the HTTP/1.1 engine, end to end through the real daemon process.

Upstreams are subprocess demo backends (``spawn_backend``) or scripted socket servers in a
thread (``RawUpstream``), so every client here may block.
"""

from __future__ import annotations

import gzip
import json
import socket
import struct
import threading
import time
from typing import Any

import pytest

from tests.support.backends import free_port
from tests.support.daemon import http_request, wait_for
from tests.support.rawupstream import (
    RawClient,
    RawRequest,
    RawResponse,
    RawUpstream,
    _Reader,
    read_until_closed,
    simple_response,
)


def proxy_config(*urls: str, **upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": {"u": {"servers": [{"url": url} for url in urls], **upstream}},
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "u"}],
    }


@pytest.fixture
def backend(spawn_backend):
    _, port = spawn_backend("b1")
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def echo_daemon(start_sluicegate, backend):
    return start_sluicegate(proxy_config(backend))


def echo(daemon, raw: bytes) -> tuple[RawResponse, dict[str, Any]]:
    with RawClient(daemon.port) as client:
        response = client.request(raw)
    assert response.status == 200, response.body
    return response, response.json()


def names(echoed: dict[str, Any]) -> list[str]:
    return [name.lower() for name, _ in echoed["headers"]]


def values(echoed: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in echoed["headers"] if key.lower() == name.lower()]


def assert_json_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict:
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert set(payload) == {"error", "request_id"}
    assert payload["error"]
    assert payload["request_id"] == headers["x-request-id"]
    return payload


# -- request rewriting ---------------------------------------------------------------------------


HOP_BY_HOP_REQUEST = (
    b"GET /echo HTTP/1.1\r\n"
    b"Host: app.example:8080\r\n"
    b"Connection: keep-alive, X-Secret-Hop\r\n"
    b"X-Secret-Hop: must-not-pass\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"TE: trailers\r\n"
    b"Trailer: X-Checksum\r\n"
    b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
    b"X-End-To-End: kept\r\n"
    b"Authorization: Bearer kept\r\n"
    b"\r\n"
)
REQUEST_HOP_NAMES = {
    "connection",
    "x-secret-hop",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "proxy-authorization",
    "upgrade",
}


def test_hop_by_hop_request_headers_are_removed(echo_daemon):
    _, seen = echo(echo_daemon, HOP_BY_HOP_REQUEST)
    assert not REQUEST_HOP_NAMES & set(names(seen)), seen["headers"]
    assert values(seen, "X-End-To-End") == ["kept"]
    assert values(seen, "Authorization") == ["Bearer kept"]


@pytest.mark.parametrize(
    "upgrade_headers",
    [
        pytest.param(b"Upgrade: h2c\r\n", id="upgrade-alone"),
        pytest.param(b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n", id="h2c"),
    ],
)
def test_non_websocket_upgrade_is_not_forwarded(echo_daemon, upgrade_headers):
    raw = b"GET /echo HTTP/1.1\r\nHost: h\r\n" + upgrade_headers + b"HTTP2-Settings: AAA\r\n\r\n"
    with RawClient(echo_daemon.port) as client:
        response = client.request(raw)
        assert response.status == 200, response.body
        seen = response.json()
        assert not {"upgrade", "connection"} & set(names(seen)), seen["headers"]
        if b"HTTP2-Settings" in upgrade_headers:
            assert "http2-settings" not in names(seen)
        # and the connection is still plain HTTP/1.1
        again = client.request(b"GET /echo HTTP/1.1\r\nHost: h\r\n\r\n")
        assert again.status == 200


def test_forwarded_headers_and_host(echo_daemon):
    _, seen = echo(echo_daemon, b"GET /echo HTTP/1.1\r\nHost: App.Example:8080\r\n\r\n")
    assert values(seen, "Host") == ["App.Example:8080"]
    assert values(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert values(seen, "X-Forwarded-Proto") == ["http"]
    assert values(seen, "X-Forwarded-Host") == ["App.Example:8080"]


def test_x_forwarded_for_is_appended_to(echo_daemon):
    _, seen = echo(
        echo_daemon,
        b"GET /echo HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 203.0.113.9, 10.0.0.1\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: spoofed\r\n\r\n",
    )
    assert values(seen, "X-Forwarded-For") == ["203.0.113.9, 10.0.0.1, 127.0.0.1"]
    # what the proxy knows replaces what the client claims
    assert values(seen, "X-Forwarded-Proto") == ["http"]
    assert values(seen, "X-Forwarded-Host") == ["h"]


def test_repeated_x_forwarded_for_headers_are_merged(echo_daemon):
    _, seen = echo(
        echo_daemon,
        b"GET /echo HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1\r\n"
        b"X-Forwarded-For: 2.2.2.2\r\n\r\n",
    )
    assert values(seen, "X-Forwarded-For") == ["1.1.1.1, 2.2.2.2, 127.0.0.1"]


def test_request_id_generated_forwarded_and_returned(echo_daemon):
    response, seen = echo(echo_daemon, b"GET /echo HTTP/1.1\r\nHost: h\r\n\r\n")
    [sent] = values(seen, "X-Request-ID")
    assert sent
    assert response.header("X-Request-ID") == sent
    other, _ = echo(echo_daemon, b"GET /echo HTTP/1.1\r\nHost: h\r\n\r\n")
    assert other.header("X-Request-ID") != sent


def test_client_request_id_is_kept(echo_daemon):
    response, seen = echo(
        echo_daemon, b"GET /echo HTTP/1.1\r\nHost: h\r\nX-Request-ID: client-abc-123\r\n\r\n"
    )
    assert values(seen, "X-Request-ID") == ["client-abc-123"]
    assert response.header("X-Request-ID") == "client-abc-123"


@pytest.mark.parametrize(
    "target",
    [
        b"/echo",
        b"/echo?a=%2F%2f&b=%20+c&&=&x",
        b"/echo?q=a%01b&%zz=1",
        b"/echo?redirect=http://other/x?y=1/../z",
        b"/echo?;,@$!'()*[]",
        b"/echo?k=%E2%82%AC&k=2",
    ],
)
def test_request_target_is_sent_exactly(start_sluicegate, target):
    """The query exactly as sent; the path in its normal form (http/pathnorm.py): the one the
    route matched."""
    with RawUpstream(simple_response()) as upstream:
        daemon = start_sluicegate(proxy_config(upstream.url))
        with RawClient(daemon.port) as client:
            assert client.request(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n").status == 200
            for odd in (b"//double//slash", b"/a%2Fb/%7e/./../c", b"/p;param=1/x%41"):
                assert client.request(b"GET " + odd + b" HTTP/1.1\r\nHost: h\r\n\r\n").status == 200
    assert [r.target for r in upstream.requests] == [
        target,
        b"/double/slash",
        b"/a%2Fb/c",
        b"/p;param=1/xA",
    ]


# -- response rewriting --------------------------------------------------------------------------


def test_hop_by_hop_response_headers_are_removed(start_sluicegate):
    hop = (
        b"Connection: keep-alive, X-Upstream-Secret\r\n"
        b"X-Upstream-Secret: hidden\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\n"
        b"Proxy-Authenticate: Basic realm=x\r\n"
        b"Proxy-Authorization: Basic eA==\r\n"
        b"X-Kept: yes\r\n"
    )
    with RawUpstream(simple_response(b"hello", headers=hop)) as upstream:
        daemon = start_sluicegate(proxy_config(upstream.url))
        with RawClient(daemon.port) as client:
            response = client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert response.status == 200
            assert response.body == b"hello"
            leaked = response.header_names() & {
                "x-upstream-secret",
                "keep-alive",
                "proxy-connection",
                "te",
                "trailer",
                "upgrade",
                "proxy-authenticate",
                "proxy-authorization",
            }
            assert not leaked, response.headers
            assert response.header("Connection") in (None, "keep-alive")
            assert response.header("X-Kept") == "yes"
            assert response.header("X-Request-ID")
            assert client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").body == b"hello"


def test_content_encoding_and_body_bytes_untouched(start_sluicegate):
    payload = gzip.compress(b"compressible " * 1000)

    def respond(request: RawRequest, sock: socket.socket) -> bool:
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\nVary: Accept-Encoding\r\n\r\n%b" % (len(payload), payload)
        )
        return True

    with RawUpstream(respond) as upstream:
        daemon = start_sluicegate(proxy_config(upstream.url))
        status, headers, body = http_request(
            daemon.port, "GET", "/", headers={"Accept-Encoding": "gzip"}
        )
    assert status == 200
    assert headers["content-encoding"] == "gzip"
    assert body == payload
    assert upstream.requests[0].header("Accept-Encoding") == "gzip"


def test_upstream_request_id_is_not_overwritten(start_sluicegate):
    with RawUpstream(simple_response(headers=b"X-Request-ID: from-upstream\r\n")) as upstream:
        daemon = start_sluicegate(proxy_config(upstream.url))
        _, headers, _ = http_request(daemon.port, "GET", "/")
    assert headers["x-request-id"] == "from-upstream"


# -- errors the proxy makes ----------------------------------------------------------------------


def test_no_route_is_404_json(start_sluicegate, backend):
    config = proxy_config(backend)
    config["routes"][0]["match"] = {"path_prefix": "/only/"}
    daemon = start_sluicegate(config)
    status, headers, body = http_request(daemon.port, "GET", "/elsewhere")
    assert_json_error(status, headers, body, 404)
    status, headers, body = http_request(
        daemon.port, "GET", "/elsewhere", headers={"X-Request-ID": "given-1"}
    )
    assert assert_json_error(status, headers, body, 404)["request_id"] == "given-1"


def test_refused_upstream_is_502_json(start_sluicegate):
    daemon = start_sluicegate(proxy_config(f"http://127.0.0.1:{free_port()}"))
    status, headers, body = http_request(daemon.port, "GET", "/")
    assert_json_error(status, headers, body, 502)


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"NOT HTTP AT ALL\r\n\r\n", id="garbage"),
        pytest.param(b"HTTP/1.1 2000 Huge\r\nContent-Length: 0\r\n\r\n", id="bad-status"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc", id="two-cl"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n",
            id="cl-and-te",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", id="bad-header"),
    ],
)
def test_malformed_response_is_502_and_connection_not_reused(start_sluicegate, reply):
    replies = iter([reply])

    def respond(request: RawRequest, sock: socket.socket) -> bool:
        data = next(replies, None)
        if data is None:
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood")
        else:
            sock.sendall(data)
        return True  # keep the socket open: only the proxy may decide not to reuse it

    with RawUpstream(respond) as upstream:
        daemon = start_sluicegate(proxy_config(upstream.url, retry={"tries": 1}))
        status, headers, body = http_request(daemon.port, "GET", "/")
        assert_json_error(status, headers, body, 502)
        status, _, body = http_request(daemon.port, "GET", "/")
        assert (status, body) == (200, b"good")
        assert upstream.connections == 2


def test_no_eligible_server_is_503_json(start_sluicegate, backend):
    daemon = start_sluicegate(proxy_config(backend, backend.replace("127.0.0.1", "localhost")))
    assert http_request(daemon.port, "GET", "/")[0] == 200
    for index in (0, 1):
        status, _, body = daemon.admin("POST", f"/upstreams/u/servers/{index}/drain")
        assert status == 200, body
        assert json.loads(body)["draining"] is True
    status, headers, body = http_request(daemon.port, "GET", "/")
    assert_json_error(status, headers, body, 503)
    assert daemon.admin("POST", "/upstreams/u/servers/1/undrain")[0] == 200
    assert http_request(daemon.port, "GET", "/")[0] == 200


def test_read_timeout_is_504_json(start_sluicegate, backend):
    daemon = start_sluicegate(
        proxy_config(backend, timeouts={"connect": "1s", "read": "300ms"}, retry={"tries": 1})
    )
    started = time.monotonic()
    status, headers, body = http_request(daemon.port, "GET", "/delay/3000")
    assert_json_error(status, headers, body, 504)
    assert time.monotonic() - started < 2.5
    assert http_request(daemon.port, "GET", "/delay/10")[0] == 200


# -- the HTTP/1.1 engine through the daemon ------------------------------------------------------


def test_keep_alive_several_requests_one_socket(echo_daemon):
    with RawClient(echo_daemon.port) as client:
        for i in range(5):
            response = client.request(b"GET /echo?i=%d HTTP/1.1\r\nHost: h\r\n\r\n" % i)
            assert response.status == 200
            assert response.json()["path"] == f"/echo?i={i}"
        assert not client.is_closed(timeout=0.2)


def test_pipelined_requests_answered_in_order(echo_daemon):
    with RawClient(echo_daemon.port) as client:
        client.send(
            b"GET /delay/200 HTTP/1.1\r\nHost: h\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /echo?third HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        first = client.read_response()
        second = client.read_response()
        third = client.read_response()
    assert first.body.endswith(b"delayed 200ms\n")
    assert second.json()["body"] == "hello"
    assert third.json()["path"] == "/echo?third"


def test_a_long_pipeline_of_requests_answered_at_once(start_sluicegate, backend):
    """Requests answered without an upstream (404 here) complete as they start. Thousands
    queued behind a slow one must not nest one call deeper each."""
    config = proxy_config(backend)
    config["routes"] = [{"name": "slow", "match": {"path_prefix": "/delay"}, "upstream": "u"}]
    daemon = start_sluicegate(config)
    count = 3000
    with RawClient(daemon.port) as client:
        client.send(
            b"GET /delay/100 HTTP/1.1\r\nHost: h\r\n\r\n"
            + b"GET /nothing HTTP/1.1\r\nHost: h\r\n\r\n" * count
        )
        assert client.read_response().status == 200
        statuses = [client.read_response().status for _ in range(count)]
        assert statuses == [404] * count
        assert client.request(b"GET /delay/1 HTTP/1.1\r\nHost: h\r\n\r\n").status == 200


def test_content_length_body_reframed(echo_daemon):
    body = bytes(range(256)) * 40
    with RawClient(echo_daemon.port) as client:
        response = client.request(
            b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
    seen = response.json()
    assert seen["body_length"] == len(body)
    assert values(seen, "Content-Length") == [str(len(body))]


def test_chunked_request_body_reframed(echo_daemon):
    with RawClient(echo_daemon.port) as client:
        response = client.request(
            b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n1;ext=x\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
        seen = response.json()
        assert seen["body"] == "hello world!"
        assert seen["method"] == "POST"
        framing = set(names(seen)) & {"content-length", "transfer-encoding"}
        assert len(framing) == 1
        assert "x-trailer" not in names(seen)
        assert client.request(b"GET /echo HTTP/1.1\r\nHost: h\r\n\r\n").status == 200


def test_chunked_response_reframed_to_client(echo_daemon):
    with RawClient(echo_daemon.port) as client:
        response = client.request(b"GET /stream/200000 HTTP/1.1\r\nHost: h\r\n\r\n")
        assert response.header("Transfer-Encoding") == "chunked"
        assert response.body == b"x" * 200000
        assert client.request(b"GET /stream/0 HTTP/1.1\r\nHost: h\r\n\r\n").body == b""


def test_http10_client_gets_a_framed_or_close_delimited_response(echo_daemon):
    for path in (b"/bytes/1000", b"/stream/1000"):
        with RawClient(echo_daemon.port) as client:
            client.send(b"GET " + path + b" HTTP/1.0\r\n\r\n")
            response = client.read_response()
            assert response.status == 200
            assert response.header("Transfer-Encoding") is None
            assert response.body == b"x" * 1000
            assert client.is_closed()


def test_http10_keep_alive_client(echo_daemon):
    with RawClient(echo_daemon.port) as client:
        for _ in range(2):
            response = client.request(b"GET /bytes/10 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert response.body == b"x" * 10
            assert response.header("Connection").lower() == "keep-alive"


def test_head_has_no_body_and_connection_stays_usable(echo_daemon):
    with RawClient(echo_daemon.port) as client:
        response = client.request(
            b"HEAD /bytes/5000 HTTP/1.1\r\nHost: h\r\n\r\n", head_request=True
        )
        assert response.status == 200
        assert response.header("Content-Length") == "5000"
        response = client.request(b"GET /bytes/7 HTTP/1.1\r\nHost: h\r\n\r\n")
        assert response.body == b"x" * 7
        response = client.request(b"HEAD /stream/50 HTTP/1.1\r\nHost: h\r\n\r\n", head_request=True)
        assert response.status == 200
        assert client.request(b"GET /bytes/3 HTTP/1.1\r\nHost: h\r\n\r\n").body == b"xxx"


def test_204_and_304_have_no_body(start_sluicegate):
    def respond(request: RawRequest, sock: socket.socket) -> bool:
        if request.target == b"/204":
            sock.sendall(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
        else:
            sock.sendall(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n')
        return True

    with RawUpstream(respond) as upstream:
        daemon = start_sluicegate(proxy_config(upstream.url))
        with RawClient(daemon.port) as client:
            client.send(
                b"GET /204 HTTP/1.1\r\nHost: h\r\n\r\n"
                b'GET /304 HTTP/1.1\r\nHost: h\r\nIf-None-Match: "v1"\r\n\r\n'
                b"GET /204 HTTP/1.1\r\nHost: h\r\n\r\n"
            )
            first, second, third = (client.read_response() for _ in range(3))
            assert (first.status, second.status, third.status) == (204, 304, 204)
            for response in (first, second, third):
                assert response.header("Transfer-Encoding") is None
            assert second.header("ETag") == '"v1"'
            assert not client.reader.buf
            assert not client.is_closed(timeout=0.2)
        assert upstream.connections == 1


def test_an_upgrade_the_upstream_declines_leaves_an_http_connection(echo_daemon):
    """No 101: the response is an ordinary one, and the connection goes on as HTTP, with
    the request the client pipelined behind the offer and the ones after it."""
    offer = b"GET /echo HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    with RawClient(echo_daemon.port) as client:
        client.send(offer + b"GET /echo?second HTTP/1.1\r\nHost: h\r\n\r\n")
        assert client.read_response().json()["path"] == "/echo"
        assert client.read_response().json()["path"] == "/echo?second"
        third = client.request(b"GET /echo?third HTTP/1.1\r\nHost: h\r\n\r\n")
        assert third.json()["path"] == "/echo?third"
        client.sock.shutdown(socket.SHUT_WR)  # done: the proxy closes at once
        assert read_until_closed(client.sock, timeout=3)[0] == b""


def test_expect_100_continue(echo_daemon):
    with RawClient(echo_daemon.port) as client:
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        interim = client.read_response()
        assert interim.status == 100
        client.send(b"data")
        final = client.read_response()
        assert final.status == 200
        seen = final.json()
        assert seen["body"] == "data"
        assert "expect" not in names(seen)


def test_expect_100_continue_for_an_idempotent_put(echo_daemon):
    with RawClient(echo_daemon.port) as client:
        client.send(
            b"PUT /echo HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
        )
        assert client.read_response().status == 100
        client.send(b"put")
        assert client.read_response().json()["body"] == "put"


def test_close_delimited_response_reaches_client_intact(start_sluicegate):
    payload = bytes(range(256)) * 1000

    def respond(request: RawRequest, sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        for i in range(0, len(payload), 10000):
            sock.sendall(payload[i : i + 10000])
        sock.shutdown(socket.SHUT_WR)
        return False

    with RawUpstream(respond) as upstream:
        daemon = start_sluicegate(proxy_config(upstream.url))
        with RawClient(daemon.port) as client:
            response = client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert response.body == payload
            # re-framed for a 1.1 client, so the client connection survives
            assert response.header("Transfer-Encoding") == "chunked"
            assert client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").body == payload
        with RawClient(daemon.port) as client:
            client.send(b"GET / HTTP/1.0\r\n\r\n")
            assert client.read_response().body == payload
        assert upstream.connections == 3


def test_upstream_connections_are_pooled(start_sluicegate):
    with RawUpstream(simple_response(b"pooled")) as upstream:
        daemon = start_sluicegate(proxy_config(upstream.url))
        for _ in range(10):
            with RawClient(daemon.port) as client:  # a new client connection each time
                assert client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").body == b"pooled"
        assert upstream.connections == 1
        assert len(upstream.requests) == 10


def test_pooled_connection_closed_as_the_request_arrives_is_retried_on_a_fresh_one(
    start_sluicegate,
):
    """The idle-close race: the upstream closes a pooled connection just as our request
    reaches it. Nothing was answered, so a GET goes again on a new connection, without
    spending one of its tries (tries: 1 here, so a real failure would be a 502)."""
    answered: list[socket.socket] = []  # kept alive, so no id() is ever reused

    def respond(request: RawRequest, sock: socket.socket) -> bool:
        if any(sock is seen for seen in answered):
            return False  # this connection served one already: drop it, unanswered
        answered.append(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
        return True

    with RawUpstream(respond) as upstream:
        daemon = start_sluicegate(proxy_config(upstream.url, retry={"tries": 1}))
        with RawClient(daemon.port) as client:
            for _ in range(3):
                response = client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                assert (response.status, response.body) == (200, b"fresh")
        assert upstream.connections == 3
        assert len(upstream.requests) == 5  # 3 answered, 2 dropped by their connection


def test_upstream_connection_close_is_not_reused(start_sluicegate):
    def respond(request: RawRequest, sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        return False

    with RawUpstream(respond) as upstream:
        daemon = start_sluicegate(proxy_config(upstream.url))
        with RawClient(daemon.port) as client:
            for _ in range(3):
                response = client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                assert response.body == b"ok"
                assert response.header("Connection") is None  # the client connection stays
        assert upstream.connections == 3


def test_post_body_larger_than_retry_buffer_streams(echo_daemon):
    body = b"y" * (3 * 1024 * 1024)
    status, _, reply = http_request(echo_daemon.port, "POST", "/echo", body=body)
    assert status == 200
    assert json.loads(reply)["body_length"] == len(body)


def test_early_upstream_response_does_not_desync_the_pooled_connection(start_sluicegate):
    """An upstream may answer before it has the whole request body (nginx, a 413...). That
    connection is out of step until the body is sent in full: it must not be reused, or the
    next request would be read as the rest of this body."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    connections = []

    def serve_connection(sock: socket.socket) -> None:
        reader = _Reader(sock)
        with sock:
            while True:
                head = reader.until(b"\r\n\r\n")
                if head is None:
                    return
                request = RawRequest(head)
                length = int(request.header("Content-Length") or 0)
                if request.method == b"POST":
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")
                    try:
                        reader.exactly(length, False)  # then reads the body, as servers do
                    except ConnectionError:
                        return
                else:
                    reader.exactly(length, False)
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def serve() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            connections.append(sock)
            threading.Thread(target=serve_connection, args=(sock,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        daemon = start_sluicegate(
            proxy_config(f"http://127.0.0.1:{port}", timeouts={"read": "2s"}, retry={"tries": 1})
        )
        with RawClient(daemon.port) as client:
            client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n")
            client.send(b"a" * 1000)
            assert client.read_response().body == b"early"
            # the client could go on sending its body, but here it stops and leaves
        with RawClient(daemon.port) as client:
            response = client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (response.status, response.body) == (200, b"ok")
        assert len(connections) == 2
    finally:
        listener.close()


def test_client_gone_mid_request_aborts_the_upstream_exchange(start_sluicegate):
    answered = threading.Event()

    def respond(request: RawRequest, sock: socket.socket) -> bool:
        if request.target == b"/slow":
            time.sleep(0.5)
            try:
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
            except OSError:
                pass
            answered.set()
            return True
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfast")
        return True

    with RawUpstream(respond) as upstream:
        daemon = start_sluicegate(proxy_config(upstream.url))
        with RawClient(daemon.port) as client:
            client.send(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
            time.sleep(0.1)
            # gone for good (RST): a mere FIN is a half-close, whose reader still gets the answer
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert answered.wait(5)
        with RawClient(daemon.port) as client:
            for _ in range(2):
                assert client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").body == b"fast"
        # the abandoned exchange's connection was closed, not pooled: a fresh one served
        assert upstream.connections == 2


@pytest.mark.parametrize(
    ("method", "reaches_upstream"),
    [(b"POST", True), (b"PUT", False)],  # streamed as it comes / held for a replay first
)
def test_client_closing_its_side_mid_body_ends_the_request_at_once(
    start_sluicegate, method, reaches_upstream
):
    """A FIN before the whole body arrived: that body can never complete, so the request
    ends now (499, the upstream exchange aborted), not when client_body_timeout fires."""
    with RawUpstream(simple_response(b"ok")) as upstream:
        config = proxy_config(upstream.url)
        config["limits"] = {"client_body_timeout": "10s"}
        daemon = start_sluicegate(config)
        with RawClient(daemon.port) as client:
            client.send(method + b" / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n")
            client.send(b"x" * 10)
            client.sock.shutdown(socket.SHUT_WR)
            answer, seconds = read_until_closed(client.sock, timeout=8)
            assert (answer, seconds < 2) == (b"", True)
        (line,) = wait_for(lambda: daemon.access_log(), message="the access log line")
        assert (line["status"], line["error"], line["bytes_in"]) == (499, "client went away", 10)
        with RawClient(daemon.port) as client:
            assert client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").body == b"ok"
        # A request cut short is never completed upstream: its connection is not reused.
        assert upstream.connections == (2 if reaches_upstream else 1)
        assert [r.method for r in upstream.requests] == [b"GET"]


def test_head_responses_keep_the_upstream_connection_in_step(start_sluicegate):
    def respond(request: RawRequest, sock: socket.socket) -> bool:
        if request.method == b"HEAD":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        else:
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")
        return True

    with RawUpstream(respond) as upstream:
        daemon = start_sluicegate(proxy_config(upstream.url))
        with RawClient(daemon.port) as client:
            for _ in range(3):
                head = client.request(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n", head_request=True)
                assert head.header("Content-Length") == "1000"
                assert client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").body == b"get"
        assert upstream.connections == 1
