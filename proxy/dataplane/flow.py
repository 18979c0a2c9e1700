"""What both sides' protocols share: the reasons reading is paused for, and the HTTP
version of a parsed head.

Several things may each want a connection to stop reading at once (a full write buffer on
the other side, a held body, pipelined requests waiting their turn). The transport reads
again only when every reason is gone, so one party resuming never undoes another's pause.
Both connections keep that set of reasons (``ClientEngine._pause``/``_resume`` in
dataplane/client.py, ``UpstreamConnection.pause_reading``/``resume_reading`` in
dataplane/upstream.py), each on its own C fields: extension types in two modules cannot
share a base class without ``.pxd`` declarations. tests/unit/test_flow.py runs the same
checks on both.
"""

from __future__ import annotations

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
