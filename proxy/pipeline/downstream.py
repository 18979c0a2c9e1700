"""What the pipeline needs of the client side: the ``Downstream`` protocol.

``proxy.dataplane.client.ClientConnection`` (HTTP/1) implements it; the exchange talks to
nothing else of it, so that another front end (HTTP/2 streams, an in-process test) can
drive the same lifecycle. The request it serves is ``proxy.dataplane.request.Request``'s
shape (method, target, headers, body...), which such a front end would build too.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class Downstream(Protocol):
    loop: asyncio.AbstractEventLoop
    listener: Any  # .runtime (the config generation), .shutting_down (drain in progress)
    closed: bool  # the client went away (or was sent away)
    response_started: bool  # bytes of the response reached the transport
    peer: str  # the client's address, for X-Forwarded-For
    scheme: bytes  # b"http" / b"https", for X-Forwarded-Proto
    # What the front end itself answered before closing (408 stalled body, 413): status,
    # reason, bytes sent; None when the client simply left.
    rejected_with: tuple[int, str, int] | None

    # -- output, in order
    def write(self, data: bytes) -> None: ...

    def write_after(self, head: bytes, data: bytes) -> None: ...

    def begin_response(self) -> None: ...

    def respond(self, head: bytes, body: bytes = b"") -> None: ...

    # -- flow control and the upstream it is tied to
    def relay_from(self, upstream: Any) -> None: ...

    def tie_upstream(self, upstream: Any) -> None: ...

    def pause_reading(self, reason: Any) -> None: ...

    def resume_reading(self, reason: Any) -> None: ...

    # -- switching protocols
    def open_tunnel(self, tunnel: Any) -> None: ...

    def take_early_tunnel_bytes(self) -> bytes: ...

    # -- the request's end
    def request_done(self, request: Any) -> None: ...

    def request_crashed(self, request: Any) -> None: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...
