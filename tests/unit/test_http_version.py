"""``flow.http_version`` answers what httptools' ``get_http_version`` answers, for every
version llhttp accepts, with and without the headers that set its keep-alive flags."""

from __future__ import annotations

import itertools

import httptools
import pytest

from proxy.dataplane.flow import http_version

VERSIONS = ("0.9", "1.0", "1.1", "2.0")
CONNECTION_HEADERS = (
    b"",
    b"Connection: keep-alive\r\n",
    b"Connection: close\r\n",
    b"Connection: \r\n",
    b"Proxy-Connection: keep-alive\r\n",
    b"proxy-connection: close\r\n",
    b"Keep-Alive: timeout=5\r\n",
)
FRAMING = (b"", b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n")


class _Head:
    """Parser callbacks that answer as the proxy's connections do, inside the callback."""

    def __init__(self, parser_class: type) -> None:
        self.parser = parser_class(self)
        self.lowered: list[bytes] = []
        self.answers: tuple[str, str] | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.lowered.append(name.lower())

    def on_headers_complete(self) -> None:
        parser = self.parser
        fast = http_version(parser, parser.should_keep_alive(), self.lowered)
        self.answers = (fast, parser.get_http_version())


@pytest.mark.parametrize(
    ("version", "connection", "framing"),
    list(itertools.product(VERSIONS, CONNECTION_HEADERS, FRAMING)),
)
@pytest.mark.parametrize("side", ["request", "response"])
def test_same_version_as_llhttp_says(version, connection, framing, side):
    if side == "request":
        head = _Head(httptools.HttpRequestParser)
        start = b"GET / HTTP/%s\r\nHost: a\r\n" % version.encode()
    else:
        head = _Head(httptools.HttpResponseParser)
        start = b"HTTP/%s 200 OK\r\n" % version.encode()
    head.parser.feed_data(start + connection + framing + b"\r\n")
    assert head.answers is not None
    fast, slow = head.answers
    assert fast == slow == version
