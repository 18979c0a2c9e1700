"""Answers sent in one piece: a response held in full (one write, with its length), and
the proxy's own errors. Each books what it sent on the exchange (status, bytes) and
whether the connection ends after it."""

from __future__ import annotations

import json
from typing import Any

from proxy.pipeline.framing import error_response, response_head


def send_buffered(ex: Any, response: Any, payload: bytes) -> None:
    """A complete response held in full: sent with its length, in one system call."""
    conn = ex.conn
    request = ex.request
    close = not request.keep_alive or conn.listener.shutting_down
    route = ex.route_runtime
    if (
        route is not None
        and route.compression is not None
        and (response.has_body or request.method == b"HEAD")
    ):
        length = len(payload) if response.has_body else response.content_length
        encoder = route.compression.encoder_for(request, response, length)
        if encoder is not None:
            payload = encoder.compress(payload) + encoder.finish()
    if response.has_body:
        response.reframe(len(payload))  # also re-frames a chunked one
    extra = ex.extra_headers + ex.sticky_cookie
    if ex.trace is not None:
        extra = with_trace(ex, extra)
    head = response_head(response, request, extra, close=close, chunked=False)
    conn.respond(head, payload if response.has_body else b"")
    ex.status = response.status
    ex.bytes_out += len(payload)
    if close:
        request.close_after()


def send_error(ex: Any, status: int, reason: str, extra_headers: bytes = b"") -> None:
    conn = ex.conn
    request = ex.request
    ex.status = status
    if not ex.error and status >= 500:
        ex.error = reason
    close = (
        not request.keep_alive
        or (request.body is not None and not request.body.complete)
        or conn.listener.shutting_down
    )
    data = error_response(
        status,
        reason,
        request.request_id or b"-",
        close=close,
        extra_headers=with_trace(ex, extra_headers),
    )
    conn.respond(data)
    ex.bytes_out += len(data)
    if close:
        request.close_after()  # said Connection: close: the connection ends after it


def with_trace(ex: Any, extra_headers: bytes) -> bytes:
    """The decision trace rides on the response head: one compact JSON header."""
    trace = ex.trace
    if trace is None:
        return extra_headers
    trace["attempts"] = ex.attempts
    encoded = json.dumps(trace, separators=(",", ":")).encode()  # ASCII: no CR/LF survives
    return extra_headers + b"X-Sluicegate-Trace: " + encoded + b"\r\n"
