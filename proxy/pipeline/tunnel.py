"""A switched (101) connection: raw bytes both ways until either side closes.

Opened by the exchange in its ``TUNNEL`` phase; ``listener.tunnel_closed()`` hears the end
once, whichever side ended it (the upstream closed, or its idle timeout; the client closed
or went away)."""

from __future__ import annotations

from typing import Any


class Tunnel:
    __slots__ = ("closed", "downstream", "listener", "upstream")

    def __init__(self, downstream: Any, upstream: Any, listener: Any) -> None:
        self.downstream = downstream
        self.upstream = upstream
        self.listener = listener
        self.closed = False

    def from_client(self, data: bytes) -> None:
        if not self.upstream.closed:
            self.upstream.tunnel_activity()
            self.upstream.transport.write(data)

    def on_body(self, data: bytes) -> None:
        self.downstream.write(data)

    def on_end(self) -> None:
        self._done()

    def on_abort(self, error: Exception) -> None:
        self._done()

    def client_closed(self) -> None:
        self.upstream.close()
        self._done()

    def _done(self) -> None:
        if not self.closed:
            self.closed = True
            self.listener.tunnel_closed()
