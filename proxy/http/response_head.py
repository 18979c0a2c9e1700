"""An upstream's response head as llhttp reads it: the fields, the framing facts, checked.

Theory of operation. llhttp (httptools) calls its protocol object back for every piece of
a response head: the reason phrase, each field, the end of the head. ``ResponseReader`` is
that protocol for one upstream connection. The head gathers in its C fields and is written
to the connection's response once, when complete (or refused); it refuses (``ValueError``)
what llhttp allows but a proxy must not relay: a head past its size bound, a bad or
repeated Content-Length, a Transfer-Encoding other than a lone ``chunked``, both framings,
chunked HTTP/1.0. The size bound counts every field of the exchange, interim (1xx) heads
included, until ``new_exchange()``. What the connection does at those moments (the
exchange's state, a HEAD response's end, the chunk scanner) stays with it
(dataplane/upstream.py): the reader passes on the message's begin and end, its body, and
the head once checked.

Compiled (proxy/compiled.py), ``ResponseReader`` is an extension type, so llhttp's
callbacks run no interpreted bytecode; an extension type cannot be an ``asyncio.Protocol``,
hence a reader apart from the connection.
"""

from __future__ import annotations

from typing import Any

try:
    import cython
except ModuleNotFoundError:  # run as Python where Cython is not installed
    from proxy import cythonshim as cython


@cython.cclass
class ResponseReader:
    """The httptools protocol of one upstream connection (see the module's docstring).

    ``conn`` is asked ``message_begun()`` for the response head a message is read into,
    told ``head_parsed(response, interim)`` once the head is checked (``interim``: a 1xx
    but 101, the final head follows), and ``on_body(chunk)`` and ``on_message_complete()``
    as llhttp calls them.
    """

    parser = cython.declare(object, visibility="readonly")  # the httptools parser
    _message_begun = cython.declare(object)
    _head_parsed = cython.declare(object)
    # The connection's own: llhttp looks its callbacks up once, as attributes, so it calls
    # these directly, never through the reader.
    on_body = cython.declare(object, visibility="readonly")
    on_message_complete = cython.declare(object, visibility="readonly")
    _limit = cython.declare(cython.Py_ssize_t)
    _fields_bytes = cython.declare(cython.Py_ssize_t)  # this exchange's heads so far
    # The message being read: its head, and the head so far.
    _response = cython.declare(object)
    _reason = cython.declare(bytes)
    _headers = cython.declare(list)
    _lowered = cython.declare(list)  # header names lower-cased once, same order
    _content_length = cython.declare(object)
    _chunked = cython.declare(cython.bint)

    def __init__(self, conn: Any, head_limit: int) -> None:
        # Bound once: llhttp's callbacks pass straight on, without a lookup each.
        self._message_begun = conn.message_begun
        self._head_parsed = conn.head_parsed
        self.on_body = conn.on_body
        self.on_message_complete = conn.on_message_complete
        self._limit = head_limit
        self._fields_bytes = 0
        self._response = None
        self.parser = None

    def new_parser(self, parser_type: Any) -> Any:
        """A fresh parser reading into this reader."""
        self.parser = parser_type(self)
        return self.parser

    def new_exchange(self) -> None:
        """The size bound counts afresh."""
        self._fields_bytes = 0

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._response = self._message_begun()
        self._reason = b""
        self._headers = []
        self._lowered = []
        self._content_length = None
        self._chunked = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        try:
            self._add_field(name, value)
        except ValueError:
            self._write_head(self._response)
            raise

    def on_headers_complete(self) -> None:
        response = self._response
        self._write_head(response)
        self._head_parsed(response, self._check_head(response))

    # -- the head ------------------------------------------------------------------------

    @cython.cfunc
    def _add_field(self, name: bytes, value: bytes) -> None:
        self._fields_bytes += len(name) + len(value) + 4
        if self._fields_bytes > self._limit:
            raise ValueError("response head too large")
        self._headers.append((name, value))
        lowered: bytes = name.lower()
        self._lowered.append(lowered)
        if lowered == b"content-length":
            length = int(value) if value.strip().isdigit() else -1
            if length < 0 or (self._content_length is not None and self._content_length != length):
                raise ValueError("invalid Content-Length")
            self._content_length = length
        elif lowered == b"transfer-encoding":
            # Only a lone "chunked" (OWS around a value is not part of it, RFC 9110 5.5).
            if self._chunked or value.strip(b" \t").lower() != b"chunked":
                raise ValueError("unsupported Transfer-Encoding")
            self._chunked = True

    @cython.cfunc
    def _check_head(self, response: Any) -> cython.bint:
        """Status, version and framing onto ``response``, refusing what must not be
        relayed; True for an interim head."""
        parser = self.parser
        status: cython.int = parser.get_status_code()
        response.status = status
        keep_alive: cython.bint = parser.should_keep_alive()
        lowered: list = self._lowered
        # What dataplane/flow.py's http_version answers, without the call: llhttp keeps a
        # connection without a Connection or Proxy-Connection field only for HTTP/1.1.
        if keep_alive and b"connection" not in lowered and b"proxy-connection" not in lowered:
            version = "1.1"
        else:
            version = parser.get_http_version()
        response.version = version
        if self._chunked and version == "1.0":
            raise ValueError("Transfer-Encoding in an HTTP/1.0 response")
        if 100 <= status < 200 and status != 101:
            # Its status line and blank line count too: bare 1xx heads add up like fields.
            self._fields_bytes += len(self._reason) + 17
            if self._fields_bytes > self._limit:
                raise ValueError("response head too large")
            return True
        if self._chunked and self._content_length is not None:
            raise ValueError("both Content-Length and Transfer-Encoding")
        if not keep_alive:
            response.keep_alive = False
        if status == 101:
            response.upgrade = True
        return False

    @cython.cfunc
    def _write_head(self, response: Any) -> None:
        """The head read so far, onto the response: once a head, the defaults left alone."""
        response.reason = self._reason
        response.headers = self._headers
        response.lowered = self._lowered
        if self._content_length is not None:
            response.content_length = self._content_length
        if self._chunked:
            response.chunked = True
