# cython: annotation_typing=False
"""Ordered routes compiled at config load into cheap byte-level matchers.

The first route whose every condition holds wins. Everything that can be computed from
the config (lower-cased host patterns, method sets, encoded prefixes) is computed here
once, so matching a request is a handful of comparisons on bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def host_without_port(host: bytes) -> bytes:
    """``Example.COM:8080`` -> ``example.com``; ``[::1]:80`` -> ``[::1]``."""
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1].lower() if end > 0 else host.lower()
    colon = host.rfind(b":")
    if colon >= 0:
        host = host[:colon]
    return host.lower()


def cookie_value(cookie_header: bytes | None, name: bytes) -> bytes | None:
    if not cookie_header:
        return None
    for pair in cookie_header.split(b";"):
        key, sep, value = pair.strip().partition(b"=")
        if sep and key == name:
            return value.strip(b'"')
    return None


class RouteMatcher:
    """One route's conditions, prepared for matching raw request fields."""

    __slots__ = (
        "cookies",
        "exact_host",
        "headers",
        "host_suffix",
        "methods",
        "path_prefix",
        "route",
    )

    def __init__(self, route: Any, match: Any) -> None:
        self.route = route
        host = (match.host or "").lower().encode()
        self.exact_host = host if host and not host.startswith(b"*.") else None
        self.host_suffix = host[1:] if host.startswith(b"*.") else None  # b".example.com"
        self.path_prefix = (match.path_prefix or "/").encode()
        self.methods = frozenset(m.encode() for m in match.methods) if match.methods else None
        self.headers = tuple(
            (name.lower().encode(), str(value).encode()) for name, value in match.headers.items()
        )
        self.cookies = tuple(
            (name.encode(), str(value).encode()) for name, value in match.cookie.items()
        )

    def prefix_only(self) -> bool:
        """Is the path prefix this route's only condition?"""
        return (
            self.methods is None
            and self.exact_host is None
            and self.host_suffix is None
            and not self.headers
            and not self.cookies
        )

    def matches(self, method: bytes, host: bytes, path: bytes, request: Any) -> bool:
        if not path.startswith(self.path_prefix):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.exact_host is not None and host != self.exact_host:
            return False
        if self.host_suffix is not None and not (
            host.endswith(self.host_suffix) and len(host) > len(self.host_suffix)
        ):
            return False
        for name, value in self.headers:
            if request.header(name) != value:
                return False
        if self.cookies:
            cookie_header = request.header(b"cookie")
            for name, value in self.cookies:
                if cookie_value(cookie_header, name) != value:
                    return False
        return True


class Router:
    """First match wins; ``match`` returns the route object given at construction, or None."""

    __slots__ = ("_matchers", "_needs_host", "_table")

    def __init__(self, routes: Iterable[tuple[Any, Any]]) -> None:
        self._matchers: Sequence[RouteMatcher] = tuple(
            RouteMatcher(route, match) for route, match in routes
        )
        self._needs_host = any(
            m.exact_host is not None or m.host_suffix is not None for m in self._matchers
        )
        # (prefix, the matcher when the route has conditions besides its prefix, route):
        # the routes a request passes over cost one C-level prefix test each, no call.
        self._table = tuple(
            (m.path_prefix, None if m.prefix_only() else m, m.route) for m in self._matchers
        )

    def match(self, method: bytes, raw_host: bytes | None, path: bytes, request: Any) -> Any:
        host = host_without_port(raw_host) if (self._needs_host and raw_host) else b""
        for prefix, conditions, route in self._table:
            if path.startswith(prefix) and (
                conditions is None or conditions.matches(method, host, path, request)
            ):
                return route
        return None
