"""HTTP/1 bytes the pipeline writes: the request head each try sends upstream, the response
head the client gets, 1xx heads passed on, and the proxy's own error answers.

Pure functions of their inputs (no I/O, no exchange state): a second front end or an
in-process test can build the same bytes. ``error_response`` is the connection engine's
(``proxy.dataplane.client``), which answers rejections itself; it is re-exported here so
that the pipeline has one place for everything it frames.
"""

from __future__ import annotations

from typing import Any

from proxy.dataplane.client import HOP_BY_HOP, REASONS, Request, error_response

__all__ = [
    "CHUNK_END",
    "CONTINUE",
    "NEVER_HOP_BY_HOP",
    "REQUEST_REWRITTEN",
    "RESPONSE_REWRITTEN",
    "error_response",
    "header",
    "interim_head",
    "named_in_connection",
    "request_head",
    "response_head",
]

# Request headers we rewrite ourselves (framing, forwarding facts, 100-continue). The
# client's copies are dropped and ours added after the hop-by-hop ones are gone, so a
# `Connection` that names one of them changes nothing (SPEC: Forwarding).
REQUEST_REWRITTEN = HOP_BY_HOP | {
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",  # always exactly one, the one the response carries
    b"x-sluicegate-trace",  # carries the admin token: never leaves the proxy
}
# Passed on even when `Connection` names it: an HTTP/1.1 request must have its Host.
NEVER_HOP_BY_HOP = b"host"
RESPONSE_REWRITTEN = HOP_BY_HOP | {b"content-length"}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNK_END = b"0\r\n\r\n"


def request_head(downstream: Any, request: Request, route: Any, *, chunked: bool) -> bytes:
    target = request.target
    prefix = route.strip_prefix
    if prefix and target.startswith(prefix):
        target = target[len(prefix) :]
        if not target.startswith(b"/"):
            target = b"/" + target
    parts = [request.method, b" ", target, b" HTTP/1.1\r\n"]
    dropped = request.connection_tokens
    for (name, value), lowered in zip(request.headers, request.lowered, strict=True):
        if lowered in REQUEST_REWRITTEN or (lowered in dropped and lowered != NEVER_HOP_BY_HOP):
            continue
        parts += (name, b": ", value, b"\r\n")
    forwarded_for = request.forwarded_for
    peer = downstream.peer.encode()
    parts += (
        b"X-Forwarded-For: ",
        forwarded_for + b", " + peer if forwarded_for else peer,
        b"\r\nX-Forwarded-Proto: ",
        downstream.scheme,
        b"\r\n",
    )
    if request.host is not None:
        parts += (b"X-Forwarded-Host: ", request.host, b"\r\n")
    # The client's own ID when it sent one (the last, if several), else the one we made.
    parts += (b"X-Request-ID: ", request.request_id, b"\r\n")  # type: ignore[arg-type]
    if request.upgrade:
        upgrade = request.header(b"upgrade") or b"websocket"
        parts += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    body = request.body
    if body is not None:
        if chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif body.complete:
            parts.append(b"Content-Length: %d\r\n" % body.received)
        else:
            parts.append(b"Content-Length: %d\r\n" % request.content_length)
    parts.append(b"\r\n")
    return b"".join(parts)


def response_head(
    response: Any, request: Request, extra_headers: bytes, *, close: bool, chunked: bool
) -> bytes:
    status = response.status
    reason = response.reason or REASONS.get(status, b"")
    parts = [b"HTTP/1.1 %d %b\r\n" % (status, reason)]
    has_request_id = False
    lowered_names = response.lowered
    dropped = named_in_connection(response) if b"connection" in lowered_names else ()
    for (name, value), lowered in zip(response.headers, lowered_names, strict=True):
        if lowered in RESPONSE_REWRITTEN or lowered in dropped:
            if lowered == b"content-length" and not response.has_body:
                parts += (name, b": ", value, b"\r\n")  # HEAD/304 announce the entity's size
            continue
        if lowered == b"x-request-id":
            has_request_id = True
        parts += (name, b": ", value, b"\r\n")
    if response.upgrade:
        upgrade = header(response.headers, b"upgrade") or b"websocket"
        parts += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    elif response.has_body:
        if response.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % response.content_length)
        elif chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
    if not has_request_id:
        parts += (b"X-Request-ID: ", request.request_id, b"\r\n")  # type: ignore[arg-type]
    if extra_headers:
        parts.append(extra_headers)
    if close:
        parts.append(b"Connection: close\r\n")
    elif request.version == "1.0":
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def interim_head(response: Any) -> bytes:
    """A 1xx head as the upstream sent it, less its hop-by-hop fields."""
    status = response.status
    parts = [b"HTTP/1.1 %d %b\r\n" % (status, response.reason or REASONS.get(status, b""))]
    dropped = named_in_connection(response)
    for (name, value), lowered in zip(response.headers, response.lowered, strict=True):
        if lowered not in RESPONSE_REWRITTEN and lowered not in dropped:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def named_in_connection(response: Any) -> tuple[bytes, ...]:
    """The fields the response's ``Connection`` names: hop-by-hop, never passed on."""
    dropped: tuple[bytes, ...] = ()
    if b"connection" in response.lowered:
        for (_, value), lowered in zip(response.headers, response.lowered, strict=True):
            if lowered == b"connection":
                dropped += tuple(t.strip().lower() for t in value.split(b","))
    return dropped


def header(headers: list[tuple[bytes, bytes]], lowered_name: bytes) -> bytes | None:
    for name, value in headers:
        if name.lower() == lowered_name:
            return value
    return None
