"""The upstream's response head as the pipeline reads it (``ResponseHead``).

Apart from dataplane/upstream.py because that module is compiled: the pipeline and the
cache, plain Python, read these fields many times a request, and a ``__slots__`` field of
a Python class is the cheapest read there is for them (an extension type's field would be
a getset descriptor, about 100 instructions a read more). Its ``__init__`` also runs
cheaper interpreted than compiled, where each store is a generic attribute set.
"""

from __future__ import annotations


class ResponseHead:
    __slots__ = (
        "chunked",
        "content_length",
        "has_body",
        "headers",
        "keep_alive",
        "lowered",
        "reason",
        "status",
        "upgrade",
        "version",
    )

    def __init__(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.lowered: list[bytes] = []  # header names lower-cased once, same order
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.upgrade = False
        self.has_body = True
        self.version = "1.1"

    def reframe(self, content_length: int | None) -> None:
        """The body relayed differs from the upstream's (held and measured, or encoded):
        framed by this length, or by chunks when None."""
        self.content_length = content_length

    def replace_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers
        self.lowered = [name.lower() for name, _ in headers]
