"""The phases of one request's lifecycle, and which phase may follow which.

Named as pingora names its filters and Envoy its stream states: a request is ``ROUTED``;
the route's request filters run (``REQUEST_FILTERS``: rate limit, cache lookup); a body a
retry may have to replay is held in full (``BODY``); a server is chosen for a try
(``SELECT``) and, when none of its pooled connections is idle, one is opened
(``CONNECT``); the request goes out and the response head is awaited (``AWAIT_HEAD``). A
listed failure status the request may still be retried for is read while small
(``HOLD_FAILED``: if no other server does better it is the answer); otherwise the response
streams to the client (``RELAY``; one that came whole with its head leaves in one write,
and the request is ``DONE`` at once) or the connection switches protocols (``TUNNEL``).
``DONE`` is the end, whatever the answer.

The table is data, checked by ``Exchange._enter`` on every change (as h11 keeps its
own), so that a path nobody drew raises ``IllegalTransition`` instead of quietly
serving a request twice or never. Notable edges: ``SELECT`` again after a try failed
(a retry, or the next server when a breaker refuses); ``AWAIT_HEAD`` to ``CONNECT``
for the idle-close race (a pooled connection the upstream closed while idle: once, on
another connection to the same server); ``REQUEST_FILTERS`` to ``DONE`` for a
request a filter answered (429, a cache hit).
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    ROUTED = "routed"
    REQUEST_FILTERS = "request_filters"
    BODY = "body"
    SELECT = "select"
    CONNECT = "connect"
    AWAIT_HEAD = "await_head"
    HOLD_FAILED = "hold_failed"
    RELAY = "relay"
    TUNNEL = "tunnel"
    DONE = "done"

    # Members are singletons: identity hashing is exact, and C-fast where Enum's own
    # __hash__ is a Python call on every lookup in the table (as flow.PauseReason).
    __hash__ = object.__hash__


class IllegalTransition(RuntimeError):
    """A phase change the table does not allow: a bug in the pipeline, never the client's."""

    def __init__(self, current: Phase, wanted: Phase) -> None:
        super().__init__(f"request lifecycle: {current.value} -> {wanted.value} is not allowed")
        self.current = current
        self.wanted = wanted


_P = Phase
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    # No route (404), or the route's filters run, or (no filters) straight on to a try.
    _P.ROUTED: frozenset({_P.REQUEST_FILTERS, _P.BODY, _P.SELECT, _P.DONE}),
    # A filter answered (429, 503, a cache hit), or the request goes on.
    _P.REQUEST_FILTERS: frozenset({_P.BODY, _P.SELECT, _P.DONE}),
    # Held in full (or too large to hold), or the client went away meanwhile.
    _P.BODY: frozenset({_P.SELECT, _P.DONE}),
    # A pooled connection, a new one, or no eligible server left (503 or the last failure).
    _P.SELECT: frozenset({_P.AWAIT_HEAD, _P.CONNECT, _P.DONE}),
    # Connected, or failed (retry elsewhere, or answer), or the client left meanwhile.
    _P.CONNECT: frozenset({_P.AWAIT_HEAD, _P.SELECT, _P.DONE}),
    _P.AWAIT_HEAD: frozenset(
        {
            _P.HOLD_FAILED,  # a listed failure status: hold it, try elsewhere
            _P.RELAY,  # the answer, streamed
            _P.TUNNEL,  # 101 Switching Protocols
            _P.CONNECT,  # the idle-close race: once more, on another connection
            _P.SELECT,  # failed before a head: a retry
            # The whole answer came with its head and left in one write; or failed, no
            # retry: 502/504 (or the client left).
            _P.DONE,
        }
    ),
    _P.HOLD_FAILED: frozenset({_P.SELECT, _P.DONE}),
    # Before the head reached the client, a cache's filter may still fail over (a 304
    # whose body read failed): a retry.
    _P.RELAY: frozenset({_P.SELECT, _P.DONE}),
    _P.TUNNEL: frozenset({_P.DONE}),
    _P.DONE: frozenset(),
}
