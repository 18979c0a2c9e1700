"""`Connection` can name only the peer's own headers, never the ones the proxy sets.

The proxy removes the hop-by-hop headers first (Connection and the headers it names, and
the fixed list), then sets its own: X-Request-ID, X-Forwarded-For/-Proto/-Host, the framing
and, for a tunnel, Connection/Upgrade. So a client or an upstream naming one of those in
`Connection` strips nothing the proxy sets or needs, in either direction.

The upstream is a scripted socket server (``RawUpstream``) that records each request head;
clients are raw sockets, so the exact header lines on both sides are visible.
"""

from __future__ import annotations

import socket
from typing import Any

from tests.support.rawupstream import RawClient, RawRequest, RawUpstream, simple_response

PROXY_SET = "X-Request-ID, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host"


def config(url: str, **route: Any) -> dict[str, Any]:
    return {
        "upstreams": {"u": {"servers": [{"url": url}], "retry": {"tries": 1}}},
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "u", **route}],
    }


def header_values(message: Any, name: str) -> list[str]:
    return [value for key, value in message.headers if key.lower() == name.lower()]


def exchange(daemon: Any, raw: bytes) -> Any:
    with RawClient(daemon.port) as client:
        response = client.request(raw)
        assert not client.is_closed(timeout=0.1), "the connection should stay open"
    return response


def test_a_client_naming_x_request_id_in_connection_still_has_it_forwarded(start_sluicegate):
    with RawUpstream(simple_response()) as upstream:
        daemon = start_sluicegate(config(upstream.url))
        response = exchange(
            daemon,
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: X-Request-ID\r\n"
            b"X-Request-ID: client-id-1\r\n\r\n",
        )
        generated = exchange(
            daemon, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, x-request-id\r\n\r\n"
        )
    first, second = upstream.requests
    assert response.header("X-Request-ID") == "client-id-1"
    assert header_values(first, "X-Request-ID") == ["client-id-1"]
    assert generated.header("X-Request-ID")
    assert header_values(second, "X-Request-ID") == [generated.header("X-Request-ID")]


def test_the_upstream_gets_exactly_the_request_id_the_response_carries(start_sluicegate):
    """Several (or an empty) X-Request-ID from the client: one goes on, the one answered."""
    with RawUpstream(simple_response()) as upstream:
        daemon = start_sluicegate(config(upstream.url))
        repeated = exchange(
            daemon,
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-ID: one\r\nX-Request-ID: two\r\n\r\n",
        )
        empty = exchange(daemon, b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-ID: \r\n\r\n")
    first, second = upstream.requests
    assert header_values(first, "X-Request-ID") == [repeated.header("X-Request-ID")]
    assert repeated.header("X-Request-ID") == "two"
    assert empty.header("X-Request-ID")
    assert header_values(second, "X-Request-ID") == [empty.header("X-Request-ID")]


def test_a_connection_naming_what_the_proxy_sets_or_needs_strips_none_of_it(start_sluicegate):
    with RawUpstream(simple_response()) as upstream:
        daemon = start_sluicegate(config(upstream.url))
        response = exchange(
            daemon,
            b"POST /up HTTP/1.1\r\nHost: app.example\r\n"
            b"Connection: " + PROXY_SET.encode() + b", Host, Content-Length, X-Hop\r\n"
            b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n"
            b"X-Request-ID: rid-7\r\nX-Hop: gone\r\nX-Kept: yes\r\n"
            b"Content-Length: 5\r\n\r\nhello",
        )
    [seen] = upstream.requests
    assert response.status == 200
    assert header_values(seen, "Host") == ["app.example"]
    assert header_values(seen, "X-Request-ID") == ["rid-7"] == [response.header("X-Request-ID")]
    # The proxy's own values, as without the Connection header: the chain, then the peer.
    assert header_values(seen, "X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert header_values(seen, "X-Forwarded-Proto") == ["http"]
    assert header_values(seen, "X-Forwarded-Host") == ["app.example"]
    assert header_values(seen, "Content-Length") == ["5"]
    assert seen.body == b"hello"
    # What Connection names that the proxy does not set is still removed, as it must be.
    assert "x-hop" not in seen.header_names()
    assert "connection" not in seen.header_names()
    assert header_values(seen, "X-Kept") == ["yes"]


def test_an_upstream_naming_what_the_proxy_sets_strips_none_of_it(start_sluicegate):
    """Upstream side: its Connection names the framing, the request ID and the rate-limit
    headers; the client still gets a framed body, the ID the upstream was sent, and the
    proxy's RateLimit-* headers."""
    body = b"x" * 1000
    hop = (
        b"Connection: keep-alive, X-Request-ID, Content-Length, RateLimit-Limit, "
        b"RateLimit-Remaining, RateLimit-Reset, X-Upstream-Hop\r\n"
        b"X-Request-ID: upstream-made\r\nX-Upstream-Hop: gone\r\n"
    )
    with RawUpstream(simple_response(body, headers=hop)) as upstream:
        daemon = start_sluicegate(
            config(upstream.url, rate_limit={"rate": "100/s", "burst": 50, "key": "route"})
        )
        with RawClient(daemon.port) as client:
            responses = [
                client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"),
                client.request(b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-ID: mine\r\n\r\n"),
            ]
            assert not client.is_closed(timeout=0.1)
    for response, sent in zip(responses, upstream.requests, strict=True):
        assert response.status == 200
        assert response.body == body
        assert response.header("Content-Length") == "1000"
        assert header_values(response, "X-Request-ID") == header_values(sent, "X-Request-ID")
        assert response.header("RateLimit-Limit") == "50"
        assert response.header("RateLimit-Remaining") is not None
        assert "x-upstream-hop" not in response.header_names()
    assert responses[1].header("X-Request-ID") == "mine"


def _websocket_upstream(request: RawRequest, sock: socket.socket) -> bool:
    """Accepts the upgrade naming the proxy's headers in its Connection, then echoes."""
    sock.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade, X-Request-ID\r\nX-Request-ID: upstream-made\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )
    while data := sock.recv(65536):
        sock.sendall(data)
    return False


def test_a_websocket_upgrade_naming_the_request_id_still_switches(start_sluicegate):
    with RawUpstream(_websocket_upstream) as upstream:
        daemon = start_sluicegate(config(upstream.url))
        with RawClient(daemon.port) as client:
            client.send(
                b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, X-Request-ID\r\n"
                b"Upgrade: websocket\r\nX-Request-ID: ws-1\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            switched = client.read_response()
            assert switched.status == 101
            assert switched.header("Upgrade") == "websocket"
            assert "upgrade" in switched.header("Connection").lower()
            assert switched.header("X-Request-ID") == "ws-1"
            frame = b"\x81\x85abcd" + bytes(
                b ^ m for b, m in zip(b"hello", b"abcd" * 2, strict=False)
            )
            client.send(frame)
            echoed = client.reader.exactly(len(frame), True)[0]
            assert echoed == frame
    [seen] = upstream.requests
    assert header_values(seen, "X-Request-ID") == ["ws-1"]
    assert header_values(seen, "Upgrade") == ["websocket"]
    assert "upgrade" in seen.header("Connection").lower()


def _chunked_naming_its_framing(request: RawRequest, sock: socket.socket) -> bool:
    sock.sendall(
        b"HTTP/1.1 200 OK\r\nConnection: Transfer-Encoding, X-Request-ID\r\n"
        b"Transfer-Encoding: chunked\r\nX-Request-ID: upstream-made\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    return True


def test_an_upstream_naming_its_own_framing_is_still_re_framed(start_sluicegate):
    with RawUpstream(_chunked_naming_its_framing) as upstream:
        daemon = start_sluicegate(config(upstream.url))
        with RawClient(daemon.port) as client:
            for _ in range(2):  # framed right: the connection stays in step
                response = client.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                assert response.status == 200
                # Re-framed by the proxy: with a length when the body came whole, else chunked.
                framing = {"content-length", "transfer-encoding"} & response.header_names()
                assert len(framing) == 1, response.headers
                assert response.body == b"hello world"
                sent = header_values(upstream.requests[-1], "X-Request-ID")
                assert header_values(response, "X-Request-ID") == sent
