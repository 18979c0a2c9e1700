"""HTTP/1 bytes the pipeline writes: the request head each try sends upstream, the response
head the client gets, 1xx heads passed on, and the proxy's own error answers.

Pure functions of their inputs (no I/O, no exchange state): a second front end or an
in-process test can build the same bytes. ``error_response`` is the connection engine's
(``proxy.dataplane.client``), which answers rejections itself; it is re-exported here so
that the pipeline has one place for everything it frames.

Compiled (proxy/compiled.py), the two heads every request writes are C functions over
typed locals: the header lists are walked by index, the rewritten names looked up in a
typed frozenset, and a status line or a ``Content-Length`` is made without a ``%`` format
(parsed anew at every call). The request and response stay Python objects: code that stays
Python reads them far more often than the framing does (DESIGN.md, "The compiled hot path").
"""

from __future__ import annotations

from typing import Any

try:
    import cython
except ModuleNotFoundError:  # run as Python where Cython is not installed
    from proxy import cythonshim as cython

from proxy.dataplane.client import HOP_BY_HOP, REASONS, error_response

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

# The same sets typed, for the compiled lookups (a declared global is C-only, so the public
# names above stay for the modules that import them).
_REQUEST_REWRITTEN = cython.declare(frozenset, frozenset(REQUEST_REWRITTEN))
_RESPONSE_REWRITTEN = cython.declare(frozenset, frozenset(RESPONSE_REWRITTEN))
# status -> (reason, status line): the last line made for each status, reused while the
# upstream gives the same reason (at most one entry per status code).
_STATUS_LINES = cython.declare(dict, {})
# client address -> (scheme, its X-Forwarded-For and X-Forwarded-Proto lines); emptied when full.
_FORWARDED_LINES = cython.declare(dict, {})
_FORWARDED_LINES_MAX = 4096


def request_head(downstream: Any, request: Any, route: Any, *, chunked: cython.bint) -> bytes:
    target = request.target
    prefix: bytes = route.strip_prefix
    if prefix and target.startswith(prefix):
        target = target[len(prefix) :]
        if not target.startswith(b"/"):
            target = b"/" + target
    parts: list = [request.method, b" ", target, b" HTTP/1.1\r\n"]
    dropped: tuple = request.connection_tokens
    headers: list = request.headers
    lowered_names: list = request.lowered
    count: cython.Py_ssize_t = len(headers)
    if len(lowered_names) != count:
        raise ValueError("a request's headers and their lowered names differ in number")
    i: cython.Py_ssize_t
    for i in range(count):
        lowered: bytes = lowered_names[i]
        if lowered in _REQUEST_REWRITTEN or (
            dropped and lowered in dropped and lowered != NEVER_HOP_BY_HOP
        ):
            continue
        field: tuple = headers[i]
        parts.append(field[0])
        parts.append(b": ")
        parts.append(field[1])
        parts.append(b"\r\n")
    forwarded_for = request.forwarded_for
    peer_address: str = downstream.peer
    if forwarded_for:
        parts.append(b"X-Forwarded-For: ")
        parts.append(forwarded_for + b", " + peer_address.encode())
        parts.append(b"\r\nX-Forwarded-Proto: ")
        parts.append(downstream.scheme)
        parts.append(b"\r\n")
    else:
        parts.append(_forwarded_lines(peer_address, downstream.scheme))
    host = request.host
    if host is not None:
        parts.append(b"X-Forwarded-Host: ")
        parts.append(host)
        parts.append(b"\r\n")
    # The client's own ID when it sent one (the last, if several), else the one we made.
    parts.append(b"X-Request-ID: ")
    parts.append(request.request_id)
    parts.append(b"\r\n")
    if request.upgrade:
        upgrade = request.header(b"upgrade") or b"websocket"
        parts.append(b"Connection: upgrade\r\nUpgrade: ")
        parts.append(upgrade)
        parts.append(b"\r\n")
    body = request.body
    if body is not None:
        if chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif body.complete:
            parts.append(_content_length_line(body.received))
        else:
            parts.append(_content_length_line(request.content_length))
    parts.append(b"\r\n")
    return b"".join(parts)


def response_head(
    response: Any,
    request: Any,
    extra_headers: bytes,
    *,
    close: cython.bint,
    chunked: cython.bint,
) -> bytes:
    parts: list = [_status_line(response.status, response.reason)]
    has_request_id: cython.bint = False
    has_body: cython.bint = response.has_body
    headers: list = response.headers
    lowered_names: list = response.lowered
    count: cython.Py_ssize_t = len(headers)
    if len(lowered_names) != count:
        raise ValueError("a response's headers and their lowered names differ in number")
    dropped: tuple = named_in_connection(response) if b"connection" in lowered_names else ()
    i: cython.Py_ssize_t
    for i in range(count):
        lowered: bytes = lowered_names[i]
        field: tuple = headers[i]
        if lowered in _RESPONSE_REWRITTEN or (dropped and lowered in dropped):
            if lowered == b"content-length" and not has_body:
                # HEAD/304 announce the entity's size
                parts.append(field[0])
                parts.append(b": ")
                parts.append(field[1])
                parts.append(b"\r\n")
            continue
        if lowered == b"x-request-id":
            has_request_id = True
        parts.append(field[0])
        parts.append(b": ")
        parts.append(field[1])
        parts.append(b"\r\n")
    if response.upgrade:
        upgrade = header(headers, b"upgrade") or b"websocket"
        parts.append(b"Connection: upgrade\r\nUpgrade: ")
        parts.append(upgrade)
        parts.append(b"\r\n")
    elif has_body:
        content_length = response.content_length
        if content_length is not None:
            parts.append(_content_length_line(content_length))
        elif chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
    if not has_request_id:
        parts.append(b"X-Request-ID: ")
        parts.append(request.request_id)
        parts.append(b"\r\n")
    if extra_headers:
        parts.append(extra_headers)
    if close:
        parts.append(b"Connection: close\r\n")
    elif request.version == "1.0":
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


@cython.cfunc
def _status_line(status: object, reason: object) -> bytes:
    """``HTTP/1.1 <status> <reason>\\r\\n``, the reason the registry's when none was given."""
    if not reason:
        reason = REASONS.get(status, b"")
    known: tuple = _STATUS_LINES.get(status)
    if known is not None and (known[0] is reason or known[0] == reason):
        return known[1]
    line: bytes = b"HTTP/1.1 " + f"{status}".encode("ascii") + b" " + reason + b"\r\n"
    _STATUS_LINES[status] = (reason, line)
    return line


@cython.cfunc
def _forwarded_lines(peer_address: str, scheme: bytes) -> bytes:
    """``X-Forwarded-For`` and ``X-Forwarded-Proto`` for a client that sent no
    ``X-Forwarded-For``: made once per client address, not encoded and joined per request."""
    known: tuple = _FORWARDED_LINES.get(peer_address)
    if known is not None and known[0] == scheme:
        return known[1]
    lines: bytes = (
        b"X-Forwarded-For: " + peer_address.encode() + b"\r\nX-Forwarded-Proto: " + scheme + b"\r\n"
    )
    if len(_FORWARDED_LINES) >= _FORWARDED_LINES_MAX:
        _FORWARDED_LINES.clear()  # many clients: start over rather than grow without end
    _FORWARDED_LINES[peer_address] = (scheme, lines)
    return lines


@cython.cfunc
def _content_length_line(length: object) -> bytes:
    # An f-string of an int is one C conversion; `b"...%d" % length` parses its format.
    return f"Content-Length: {length}\r\n".encode("ascii")


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
