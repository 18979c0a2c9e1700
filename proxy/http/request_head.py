"""A client's request head as llhttp reads it: the fields the proxy acts on, checked as
they arrive, and the request-target put in normal form.

Theory of operation. llhttp (httptools) calls its protocol object back for every piece of
a head: the URL, each field, the end of the head. ``HeadReader`` is that protocol for one
client connection; it fills the ``Request`` being parsed and refuses, with
``RequestRejected``, what llhttp allows but a proxy must not: repeated or conflicting
framing fields, a bad Host, CR/LF/NUL in a value, CONNECT, a foreign absolute-form target,
a missing Host, a request-target http/pathnorm.py refuses. What the
connection itself must do at those moments (start or queue the request, its body, its
deadlines) stays with the connection (dataplane/client.py): the reader passes on the
message's begin and end, its body, and the head once it has checked it.

Compiled (proxy/compiled.py), ``Request`` and ``HeadReader`` are extension types: llhttp's
callbacks then run no interpreted bytecode and the fields are C fields. That is why the
reader is apart from the connection: an extension type cannot be an ``asyncio.Protocol``.
"""

from __future__ import annotations

from typing import Any

try:
    import cython
except ModuleNotFoundError:  # run as Python where Cython is not installed
    from proxy import cythonshim as cython

from proxy.http.pathnorm import InvalidTarget, normalize_target

MAX_HEADER_COUNT = 100


class RequestRejected(Exception):
    """A request we refuse before forwarding; ``status`` is what the client is told."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# The request headers acted on, by lower-cased name; the rest are only kept.
(
    _HOST,
    _CONTENT_LENGTH,
    _CONNECTION,
    _TRANSFER_ENCODING,
    _EXPECT,
    _REQUEST_ID,
    _FORWARDED_FOR,
    _TRACE,
    _UPGRADE,
) = range(9)
_ACTED_ON = cython.declare(
    dict,
    {
        b"host": _HOST,
        b"content-length": _CONTENT_LENGTH,
        b"connection": _CONNECTION,
        b"transfer-encoding": _TRANSFER_ENCODING,
        b"expect": _EXPECT,
        b"x-request-id": _REQUEST_ID,
        b"x-forwarded-for": _FORWARDED_FOR,
        b"x-sluicegate-trace": _TRACE,
        b"upgrade": _UPGRADE,
    },
)


_HOST_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:[]%"


@cython.cclass
class HeadReader:
    """The httptools protocol of one client connection (see the module's docstring).

    ``conn`` is asked ``message_begun()`` for the request a message is read into; the head
    gathers here, in C fields, and is written to that request once, when it is complete
    (or refused: the log line then says what had arrived). ``conn`` is then told
    ``head_parsed(request, upgrade_offered)``, and ``on_body(chunk)`` and
    ``on_message_complete()`` as llhttp calls them.
    """

    parser = cython.declare(object, visibility="readonly")  # the httptools parser, or None
    _message_begun = cython.declare(object)
    _head_parsed = cython.declare(object)
    # The connection's own: llhttp looks its callbacks up once, as attributes, so it calls
    # these directly, never through the reader.
    on_body = cython.declare(object, visibility="readonly")
    on_message_complete = cython.declare(object, visibility="readonly")
    _checked_host = cython.declare(object)  # the last Host found valid on this connection
    _max_header_bytes = cython.declare(cython.Py_ssize_t)
    _max_body_bytes = cython.declare(object)
    # The message being read: its request, and its head so far.
    _request = cython.declare(object)
    _in_head = cython.declare(cython.bint)  # False once the head is complete: trailers
    _target = cython.declare(bytes)
    _headers = cython.declare(list)
    _lowered = cython.declare(list)  # header names lower-cased once, same order
    _head_size = cython.declare(cython.Py_ssize_t)
    _host = cython.declare(object)
    _host_count = cython.declare(cython.Py_ssize_t)
    _content_length = cython.declare(object)
    _chunked = cython.declare(cython.bint)
    _expect_continue = cython.declare(cython.bint)
    _connection_tokens = cython.declare(tuple)
    _upgrade = cython.declare(cython.bint)
    _request_id = cython.declare(object)
    _forwarded_for = cython.declare(object)
    _trace = cython.declare(object)

    def __init__(self, conn: Any, max_header_bytes: int, max_body_bytes: int) -> None:
        # Bound once: llhttp's callbacks pass straight on, without a lookup each.
        self._message_begun = conn.message_begun
        self._head_parsed = conn.head_parsed
        self.on_body = conn.on_body
        self.on_message_complete = conn.on_message_complete
        self._checked_host = None
        self._max_header_bytes = max_header_bytes
        self._max_body_bytes = max_body_bytes
        self._request = None
        self._in_head = False
        self.parser = None

    def new_parser(self, parser_type: Any) -> Any:
        """A fresh parser reading into this reader (llhttp stops for good at an upgrade)."""
        self.parser = parser_type(self)
        return self.parser

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._request = self._message_begun()
        self._in_head = True
        self._target = b""
        self._headers = []
        self._lowered = []
        self._head_size = 0
        self._host = None
        self._host_count = 0
        self._content_length = None
        self._chunked = False
        self._expect_continue = False
        self._connection_tokens = ()
        self._upgrade = False
        self._request_id = None
        self._forwarded_for = None
        self._trace = None

    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a chunked body's trailer field: never merged into the head we forward
        try:
            self._add_field(name, value)
        except RequestRejected:
            self._write_head(self._request, b"")
            raise

    def on_headers_complete(self) -> None:
        request = self._request
        parser = self.parser
        method: bytes = parser.get_method()
        self._in_head = False
        try:
            upgrade_offered: cython.bint = self._check_head(method, parser)
        except RequestRejected:
            self._write_head(request, method)
            raise
        self._head_parsed(request, upgrade_offered)

    # -- the head ------------------------------------------------------------------------

    @cython.cfunc
    def _add_field(self, name: bytes, value: bytes) -> None:
        headers: list = self._headers
        headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if len(headers) > MAX_HEADER_COUNT:
            raise RequestRejected(431, "too many request headers")
        # Byte values, not b"\r": `bytes in bytes` first tries the operand as an int and
        # raises and clears a TypeError inside (about 1,800 instructions, 6 per request).
        if 13 in value or 10 in value or 0 in value:  # CR, LF, NUL
            raise RequestRejected(400, "invalid header value")
        lowered: bytes = name.lower()
        self._lowered.append(lowered)
        kind = _ACTED_ON.get(lowered)
        if kind is None:
            return  # most headers are only forwarded: one lookup decides it
        if kind == _HOST:
            # The same Host on every request of a keep-alive connection: checked once.
            if value != self._checked_host:
                if not _valid_host(value):
                    raise RequestRejected(400, "invalid Host header")
                self._checked_host = value
            self._host = value
            self._host_count += 1
        elif kind == _CONTENT_LENGTH:
            if not value.isdigit():
                raise RequestRejected(400, "invalid Content-Length")
            length = int(value)
            if self._content_length is not None and self._content_length != length:
                raise RequestRejected(400, "conflicting Content-Length")
            self._content_length = length
        elif kind == _CONNECTION:
            self._connection_tokens += tuple(
                [token.strip().lower() for token in value.split(b",") if token.strip()]
            )
        elif kind == _TRANSFER_ENCODING:
            # Only a lone "chunked" (OWS around a value is not part of it, RFC 9110 5.5);
            # llhttp frames by the same reading, so both sides agree on where the body ends.
            if self._chunked or value.strip(b" \t").lower() != b"chunked":
                raise RequestRejected(400, "unsupported Transfer-Encoding")
            self._chunked = True
        elif kind == _EXPECT:
            if value.lower() == b"100-continue":
                self._expect_continue = True
        elif kind == _REQUEST_ID:
            self._request_id = value
        elif kind == _FORWARDED_FOR:
            self._forwarded_for = (
                value if self._forwarded_for is None else self._forwarded_for + b", " + value
            )
        elif kind == _TRACE:
            self._trace = value
        else:  # _UPGRADE
            # Only a WebSocket offer is tunnelled (and only if llhttp agrees it is an
            # upgrade, see on_headers_complete); any other Upgrade is a hop-by-hop header.
            self._upgrade = b"websocket" in value.lower()

    @cython.cfunc
    def _check_head(self, method: bytes, parser: Any) -> cython.bint:
        """Write the complete head to the request, refusing what must not be forwarded;
        True when llhttp saw an upgrade offer."""
        request = self._request
        keep_alive: cython.bint = parser.should_keep_alive()
        lowered: list = self._lowered
        # What dataplane/flow.py's http_version answers, without the call: llhttp keeps a
        # connection without a Connection or Proxy-Connection field only for HTTP/1.1.
        if keep_alive and b"connection" not in lowered and b"proxy-connection" not in lowered:
            version = "1.1"
        else:
            version = parser.get_http_version()
        upgrade_offered: cython.bint = parser.should_upgrade()
        if not upgrade_offered:
            self._upgrade = False
        self._head_size += len(self._target) + len(method) + 12
        self._write_head(request, method)
        if not keep_alive:
            request.keep_alive = False
        request.version = version
        if self._head_size > self._max_header_bytes:
            raise RequestRejected(431, "request head too large")
        if method == b"CONNECT":
            raise RequestRejected(400, "CONNECT is not supported: this is not a forward proxy")
        if version == "1.1":
            # RFC 9112 3.2: exactly one Host, whatever the form of the target.
            if self._host_count != 1:
                raise RequestRejected(400, "HTTP/1.1 request needs exactly one Host header")
        else:
            if self._host_count > 1:
                raise RequestRejected(400, "repeated Host header")
            if self._chunked:
                # RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing.
                raise RequestRejected(400, "Transfer-Encoding in an HTTP/1.0 request")
        target: bytes = self._target
        if target.startswith(b"/"):
            _normalise(request, target)
        elif target == b"*" and method == b"OPTIONS":
            request.path = b"*"
        elif b"://" in target[:16]:
            self._absolute_form(request, target)
        else:
            raise RequestRejected(400, "invalid request target")
        if self._content_length is not None:
            if self._chunked:
                raise RequestRejected(400, "both Content-Length and Transfer-Encoding")
            if self._content_length > self._max_body_bytes:
                raise RequestRejected(413, "request body too large")
        return upgrade_offered

    @cython.cfunc
    def _absolute_form(self, request: Any, target: bytes) -> None:
        # RFC 9112 3.2.2: a server must accept absolute-form; an open proxy would follow it
        # to any host. We accept it only when it names the host the request is for.
        scheme, _, rest = target.partition(b"://")
        authority, slash, remainder = rest.partition(b"/")
        if scheme.lower() not in (b"http", b"https") or not _valid_host(authority):
            raise RequestRejected(400, "invalid request target")
        host = self._host
        if host is not None and authority.lower() != host.lower():
            raise RequestRejected(400, "absolute-form target for another host")
        if host is None:  # HTTP/1.0: the target names the host
            self._headers.append((b"Host", authority))
            self._lowered.append(b"host")
        request.host = authority
        request.host_count = max(self._host_count, 1)
        _normalise(request, slash + remainder if slash else b"/")

    @cython.cfunc
    def _write_head(self, request: Any, method: bytes) -> None:
        """The head read so far, onto the request: once a head, the defaults left alone."""
        request.method = method
        request.target = self._target
        request.headers = self._headers
        request.lowered = self._lowered
        request.head_size = self._head_size
        if self._host is not None:
            request.host = self._host
            request.host_count = self._host_count
        if self._content_length is not None:
            request.content_length = self._content_length
        if self._chunked:
            request.chunked = True
        if self._expect_continue:
            request.expect_continue = True
        if self._connection_tokens:
            request.connection_tokens = self._connection_tokens
        if self._upgrade:
            request.upgrade = True
        if self._request_id is not None:
            request.request_id = self._request_id
        if self._forwarded_for is not None:
            request.forwarded_for = self._forwarded_for
        if self._trace is not None:
            request.trace = self._trace


@cython.cfunc
def _normalise(request: Any, target: bytes) -> None:
    """Routes, limits, logs and the upstream all see the normal path (http/pathnorm.py): the
    target we forward is rebuilt from it, so no spelling can match one route and reach the
    upstream as another path."""
    try:
        path, query = normalize_target(target)
    except InvalidTarget as error:
        request.target = target
        request.path = target.partition(b"?")[0]  # for the log line: what was refused
        raise RequestRejected(error.status, error.reason) from None
    request.path = path
    if query is None:
        request.target = path
    elif 37 in path or len(path) + len(query) + 1 != len(target):
        # Changed: every change but upper-cased hex (which keeps a '%') shortens the path.
        request.target = path + b"?" + query
    else:
        request.target = target


def _valid_host(value: bytes) -> bool:
    """uri-host [":" port] (RFC 3986 characters), not empty: no '/', '@', '?', spaces...

    Deleting every allowed byte must leave nothing (one C pass; runs for every request).
    """
    return bool(value) and not value.translate(None, _HOST_BYTES)
