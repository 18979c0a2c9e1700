"""The cache key: what names a stored response (pingora-cache ``key.rs``).

The *primary* key is host + normalised path + query + the route's ``cache.key`` parts
(``header:NAME``, ``cookie:NAME``). It is method-independent: HEAD is answered from what GET
stored, and unsafe methods invalidate it. ``Vary`` adds a secondary key (``variance.py``).
The URL part (host + path + query, no scheme) is what purges by URL and prefix match.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.pipeline.routing import cookie_value

_SEPARATOR = "\x1f"  # cannot appear in a request head: keeps parts from running together


def cache_url(host: bytes | None, path: bytes, target: bytes) -> str:
    """host + normalised path + query, as purges name it (``http://`` dropped)."""
    # ``in`` first: bytes.find parses its arguments from a tuple, and most targets have
    # no query.
    query = target[target.find(b"?") :] if b"?" in target else b""
    return ((host or b"").lower() + path + query).decode("latin-1")


def url_from_purge(url: str) -> str:
    """A purge's ``http://host/path?q`` in the form ``cache_url`` makes."""
    _, sep, rest = url.partition("://")
    if not sep:
        rest = url
    host, slash, remainder = rest.partition("/")
    return host.lower() + slash + remainder


@dataclass(frozen=True, slots=True)
class KeyMaker:
    """A route's key parts, compiled once at config load."""

    parts: tuple[tuple[str, bytes], ...] = ()  # ("header", b"accept-language") / ("cookie", b"sid")

    @classmethod
    def from_config(cls, key_parts: tuple[str, ...]) -> KeyMaker:
        compiled = []
        for part in key_parts:
            kind, _, name = part.partition(":")
            compiled.append((kind, name.lower().encode() if kind == "header" else name.encode()))
        return cls(tuple(compiled))

    def primary(self, url: str, request_header: object) -> str:
        """The primary key of ``url``; ``request_header(lowered_name)`` reads the request."""
        if not self.parts:
            return url
        values = [url]
        for kind, name in self.parts:
            if kind == "header":
                value = request_header(name)  # type: ignore[operator]
            else:
                value = cookie_value(request_header(b"cookie"), name)  # type: ignore[operator]
            values.append("" if value is None else value.decode("latin-1"))
        return _SEPARATOR.join(values)


def url_of(primary_key: str) -> str:
    return primary_key.partition(_SEPARATOR)[0]
