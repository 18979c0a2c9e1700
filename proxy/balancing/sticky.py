"""Sticky sessions by cookie: an opaque server id that every instance decodes alike.

The id of a server is a keyed digest (HMAC-SHA-256, truncated to 16 base64url characters,
96 bits) of the server's configured URL and the address it connects to, under a key
derived from the upstream's name. So every instance and worker with the same config
computes the same ids with no shared state, an id tells nothing of the address in clear,
and a value nobody issued matches no server. The key does not depend on the server list:
a reload that adds or removes other servers leaves existing cookies valid.

A ``StickyTable`` is built with the group's servers at config load and again whenever DNS
discovery changes them; requests only look ids up. The Set-Cookie header line of each
server is prepared here too, so answering costs nothing but a comparison.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

ID_LENGTH = 16  # base64url characters (96 bits)
_KEY_LABEL = b"sluicegate sticky v1\x00"


def upstream_key(upstream: str) -> bytes:
    return hashlib.sha256(_KEY_LABEL + upstream.encode()).digest()


def server_id(key: bytes, url: str, address: str) -> bytes:
    """The cookie value naming the server at ``address`` configured as ``url``."""
    digest = hmac.new(key, f"{url}\x00{address}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest)[:ID_LENGTH]


class StickyTable:
    """Cookie ids of one upstream's current servers, both ways."""

    __slots__ = ("_by_id", "_set_cookie", "cookie")

    def __init__(self, upstream: str, cfg: Any, servers: Iterable[Any]) -> None:
        self.cookie = cfg.cookie.encode()
        key = upstream_key(upstream)
        attributes = b"; Path=/; Max-Age=%d; HttpOnly; SameSite=Lax" % int(cfg.ttl)
        self._by_id: dict[bytes, Any] = {}
        self._set_cookie: dict[Any, tuple[bytes, bytes]] = {}
        for server in servers:
            sid = server_id(key, server.url, server.address)
            self._by_id[sid] = server
            header = b"Set-Cookie: " + self.cookie + b"=" + sid + attributes + b"\r\n"
            self._set_cookie[server] = (sid, header)

    def server_for(self, value: bytes | None) -> Any:
        """The server a presented cookie value names, or None (absent, forged, or gone)."""
        return self._by_id.get(value) if value else None

    def set_cookie(self, server: Any, presented: bytes | None) -> bytes:
        """The Set-Cookie header line that pins the client to ``server``; empty when its
        cookie already does (or the server left meanwhile)."""
        entry = self._set_cookie.get(server)
        if entry is None or entry[0] == presented:
            return b""
        return entry[1]
