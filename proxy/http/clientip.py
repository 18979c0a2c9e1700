"""The client's address: the peer, or what a trusted proxy in front of us says it is.

nginx's realip module with ``real_ip_recursive on``: walk X-Forwarded-For from the right,
skipping addresses of trusted proxies; the first untrusted one is the client. A peer that
is not trusted cannot tell us anything, so its own address is the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientAddressResolver:
    """Built once per config; ``resolve`` runs per request and is cheap when nothing is trusted."""

    __slots__ = ("_is_trusted", "_networks")

    def __init__(self, trusted: Sequence[Network]) -> None:
        self._networks = tuple(trusted)
        # Peers repeat (keep-alive, the same load balancer in front): memoise the verdict.
        self._is_trusted = lru_cache(maxsize=4096)(self._check_trusted)

    def _check_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip().split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in network for network in self._networks)

    def resolve(self, peer: str, forwarded_for: bytes | None) -> str:
        if not self._networks or not forwarded_for or not self._is_trusted(peer):
            return peer
        hops = forwarded_for.decode("latin-1").split(",")
        for hop in reversed(hops):
            hop = hop.strip()
            if not hop:
                continue
            if not self._is_trusted(hop):
                return _strip_port(hop)
        # Every hop was one of ours: the leftmost is the best we know.
        first = hops[0].strip()
        return _strip_port(first) if first else peer


def _strip_port(hop: str) -> str:
    if hop.startswith("["):  # "[2001:db8::1]:443"
        return hop[1 : hop.find("]")] if "]" in hop else hop
    if hop.count(":") == 1:  # "203.0.113.7:51000"
        return hop.split(":", 1)[0]
    return hop
