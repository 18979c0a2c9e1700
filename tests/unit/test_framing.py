"""The heads the pipeline writes, byte for byte, whichever way the framing module runs
(compiled or as Python), and its per-status and per-client caches never answer for another
status line, reason, scheme or client."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.dataplane.client import Request
from proxy.dataplane.upstream import ResponseHead
from proxy.pipeline.framing import request_head, response_head


@dataclass
class _Client:
    """What framing reads of the downstream: the client's address and the scheme."""

    peer: str
    scheme: bytes


@dataclass
class _Route:
    strip_prefix: bytes = b""


def _request(
    target: bytes = b"/small", headers: tuple[tuple[bytes, bytes], ...] = ((b"Host", b"h"),)
) -> Request:
    request = Request(None)  # type: ignore[arg-type]  # framing never reads its connection
    request.method = b"GET"
    request.target = target
    for name, value in headers:
        request.add_header(name, value)
        lowered = name.lower()
        if lowered == b"host":
            request.host = value
        elif lowered == b"x-forwarded-for":
            request.forwarded_for = value
        elif lowered == b"connection":
            request.connection_tokens = tuple(t.strip().lower() for t in value.split(b","))
    request.request_id = b"rid"
    return request


def _response(
    status: int, reason: bytes, headers: tuple[tuple[bytes, bytes], ...], *, has_body: bool = True
) -> ResponseHead:
    response = ResponseHead()
    response.status = status
    response.reason = reason
    response.replace_headers(list(headers))
    response.has_body = has_body
    for name, value in headers:
        if name.lower() == b"content-length":
            response.content_length = int(value)
    return response


def test_request_head_rewrites_the_forwarding_fields():
    request = _request(
        headers=(
            (b"Host", b"h"),
            (b"Connection", b"x-drop, host"),
            (b"X-Drop", b"1"),
            (b"X-Request-ID", b"theirs"),
            (b"Accept", b"*/*"),
        )
    )
    assert request_head(_Client("10.0.0.1", b"http"), request, _Route(), chunked=False) == (
        b"GET /small HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: h\r\nX-Request-ID: rid\r\n\r\n"
    )


def test_request_head_per_client_lines_follow_the_client_and_scheme():
    plain = _request()
    assert b"X-Forwarded-For: 10.0.0.2\r\nX-Forwarded-Proto: http\r\n" in request_head(
        _Client("10.0.0.2", b"http"), plain, _Route(), chunked=False
    )
    # Same address over TLS, then another client: neither reuses the first lines.
    assert b"X-Forwarded-For: 10.0.0.2\r\nX-Forwarded-Proto: https\r\n" in request_head(
        _Client("10.0.0.2", b"https"), plain, _Route(), chunked=False
    )
    assert b"X-Forwarded-For: 10.0.0.3\r\nX-Forwarded-Proto: http\r\n" in request_head(
        _Client("10.0.0.3", b"http"), plain, _Route(), chunked=False
    )
    relayed = _request(headers=((b"Host", b"h"), (b"X-Forwarded-For", b"1.2.3.4")))
    assert b"X-Forwarded-For: 1.2.3.4, 10.0.0.2\r\nX-Forwarded-Proto: http\r\n" in request_head(
        _Client("10.0.0.2", b"http"), relayed, _Route(), chunked=False
    )


def test_request_head_strips_the_route_prefix():
    client = _Client("10.0.0.1", b"http")
    head = request_head(client, _request(b"/api/users?q=1"), _Route(b"/api"), chunked=False)
    assert head.startswith(b"GET /users?q=1 HTTP/1.1\r\n")
    head = request_head(client, _request(b"/api"), _Route(b"/api"), chunked=False)
    assert head.startswith(b"GET / HTTP/1.1\r\n")


def test_response_head_reframes_and_keeps_a_given_reason():
    request = _request()
    response = _response(200, b"OK", ((b"Content-Type", b"text/plain"), (b"Content-Length", b"6")))
    assert response_head(response, request, b"", close=False, chunked=False) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n"
        b"X-Request-ID: rid\r\n\r\n"
    )
    # A status line is reused only for the same reason; none given takes the registry's.
    response = _response(200, b"Fine", ((b"Content-Length", b"12345678901"),))
    assert response_head(response, request, b"", close=True, chunked=False) == (
        b"HTTP/1.1 200 Fine\r\nContent-Length: 12345678901\r\n"
        b"X-Request-ID: rid\r\nConnection: close\r\n\r\n"
    )
    response = _response(404, b"", ())
    request.version = "1.0"
    assert response_head(response, request, b"X-Extra: 1\r\n", close=False, chunked=True) == (
        b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nX-Request-ID: rid\r\n"
        b"X-Extra: 1\r\nConnection: keep-alive\r\n\r\n"
    )


def test_response_head_drops_what_connection_names_but_a_bodiless_size():
    response = _response(
        304,
        b"Not Modified",
        (
            (b"Connection", b"x-hop"),
            (b"X-Hop", b"1"),
            (b"Content-Length", b"42"),
            (b"X-Request-ID", b"upstream's"),
        ),
        has_body=False,
    )
    assert response_head(response, _request(), b"", close=False, chunked=False) == (
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\nX-Request-ID: upstream's\r\n\r\n"
    )
