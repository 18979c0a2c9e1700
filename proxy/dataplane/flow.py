"""What both sides' protocols share: reading paused for named reasons, writes (a head with
the first body bytes), close and abort, and the HTTP version of a parsed head.

Several things may each want a connection to stop reading at once (a full write buffer on
the other side, a held body, pipelined requests waiting their turn). The transport reads
again only when every reason is gone, so one party resuming never undoes another's pause.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any


class PauseReason(enum.Enum):
    """Why a connection stopped reading; reading resumes when no reason is left."""

    PIPELINE = "pipeline"  # client: a request waits its turn behind the one in progress
    BODY = "body"  # client: the upstream has not taken the request body buffered so far
    CLOSING = "closing"  # client: the connection closes once the response is out
    UPGRADE = "upgrade"  # client: switching protocols; bytes after the head are a tunnel's
    REJECTED = "rejected"  # client: refused with an error, no more requests read
    UPSTREAM = "upstream"  # client: the upstream's write buffer is full
    CLIENT = "client"  # upstream: the client's write buffer is full
    HELD = "held"  # upstream: a response body is held in full (retry or cache) and is full

    # Members are singletons: identity hashing is exact, and C-fast where Enum's own
    # __hash__ is a Python call on every set operation of the request path.
    __hash__ = object.__hash__


class ProxyConnection:
    """Mixed into a Protocol that has ``transport`` and ``closed``.

    ``UpstreamConnection`` (dataplane/upstream.py), an extension type that cannot inherit
    it, has its own typed copy of these methods: a change here is a change there.
    """

    transport: asyncio.Transport | None
    closed: bool
    _reading_paused_for: set[PauseReason]

    def pause_reading(self, reason: PauseReason) -> None:
        if not self._reading_paused_for and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._reading_paused_for.add(reason)

    def resume_reading(self, reason: PauseReason) -> None:
        if reason in self._reading_paused_for:
            self._reading_paused_for.discard(reason)
            if not self._reading_paused_for and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def set_reading_paused(self, reason: PauseReason, paused: bool) -> None:
        """For callbacks that report a peer's state: ``paused`` True pauses, False resumes."""
        if paused:
            self.pause_reading(reason)
        else:
            self.resume_reading(reason)

    def reading_paused(self) -> bool:
        """Whether any reason holds reading paused."""
        return bool(self._reading_paused_for)

    def resume_all_reading(self) -> None:
        if self._reading_paused_for:
            self._reading_paused_for.clear()
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def write_after(self, head: bytes, data: bytes) -> None:
        """``head`` then ``data`` in one system call (small ones joined, large ones writev):
        a head waits for its first body bytes, on both sides."""
        if not self.closed:
            if len(data) <= 4096:
                self.transport.write(head + data)  # type: ignore[union-attr]
            else:
                self.transport.writelines((head, data))  # type: ignore[union-attr]

    def close(self) -> None:
        """Close after what is buffered has been written."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping what is buffered (a reset for the peer)."""
        if self.transport is not None:
            self.closed = True
            self.transport.abort()


def http_version(parser: Any, keep_alive: bool, lowered_names: list[bytes]) -> str:
    """The HTTP version of the head llhttp has just parsed: "1.1", "1.0", "0.9" or "2.0".

    httptools builds the string with ``str.format`` (about 1,800 instructions, once for
    each request and each response). ``keep_alive`` (llhttp's verdict on the head) tells it
    whenever no Connection or Proxy-Connection header set llhttp's keep-alive flags: llhttp
    then keeps a connection only for a version whose two numbers are above zero, and the
    only such version it accepts is 1.1.
    """
    if (
        keep_alive
        and b"connection" not in lowered_names
        and b"proxy-connection" not in lowered_names
    ):
        return "1.1"
    return parser.get_http_version()
