"""The store interface (pingora-cache ``storage.rs``) and what it keeps.

A store keeps ``StoredResponse`` objects under their primary key, one per variant
(``variance.py``). The interface is asynchronous so that a shared store (Redis) fits it;
the memory store answers at once. A response body is written while it is relayed to the
client, through a ``BodyWriter`` that gives up (and stores nothing) as soon as the body is
larger than ``max_object_size`` or the relay fails, and commits only at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.cache.policy import Freshness
from proxy.cache.variance import Variance, secondary_key

ENTRY_OVERHEAD = 256  # bytes an entry costs beyond its head and body (objects, indexes)


@dataclass(slots=True, eq=False)
class StoredResponse:
    primary: str  # primary key (key.py)
    url: str  # host + path + query: what purges by URL and prefix match
    variance: Variance
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    freshness: Freshness
    tags: tuple[str, ...] = ()
    frequency: int = field(default=0)  # eviction bookkeeping (memory store)
    # The head a hit sends, built on the first hit (hit.PreparedHead); never stored
    # elsewhere, not part of the response.
    prepared: Any = field(default=None, repr=False)

    @property
    def secondary(self) -> str:
        return secondary_key(self.variance)

    @property
    def size(self) -> int:
        head = sum(len(name) + len(value) + 4 for name, value in self.headers)
        return len(self.body) + head + len(self.primary) + ENTRY_OVERHEAD


class CacheStore(Protocol):
    max_object_size: int

    async def variants(self, primary: str) -> list[StoredResponse]:
        """Every variant stored under ``primary`` (a use counts for eviction)."""
        ...

    async def put(self, response: StoredResponse) -> bool:
        """Store (or replace the same variant); False when it does not fit."""
        ...

    async def freshen(
        self, response: StoredResponse, headers: list[tuple[bytes, bytes]], freshness: Freshness
    ) -> None:
        """A 304 revalidated ``response``: new fields and freshness, same body."""
        ...

    async def delete(self, primary: str) -> int:
        """Remove every variant under ``primary``; how many."""
        ...

    async def purge_url(self, url: str) -> int: ...

    async def purge_prefix(self, prefix: str) -> int: ...

    async def purge_tag(self, tag: str) -> int: ...

    def stats(self) -> StoreStats: ...


@dataclass(frozen=True, slots=True)
class StoreStats:
    objects: int
    bytes: int
    evictions: int


class BodyWriter:
    """Collects a body as it is relayed; ``body()`` once complete, or None when it gave up."""

    __slots__ = ("_chunks", "_size", "abandoned", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.abandoned = False

    def write(self, chunk: bytes) -> bool:
        """Keep ``chunk``; False (and nothing kept from then on) once over the limit."""
        if self.abandoned:
            return False
        self._size += len(chunk)
        if self._size > self.limit:
            self.abandon()
            return False
        self._chunks.append(chunk)
        return True

    def abandon(self) -> None:
        self.abandoned = True
        self._chunks = []

    def body(self) -> bytes | None:
        if self.abandoned:
            return None
        return b"".join(self._chunks)


def tags_of(headers: list[tuple[bytes, bytes]]) -> tuple[str, ...]:
    """Cache-Tag / Surrogate-Key values, space- or comma-separated."""
    tags: list[str] = []
    for name, value in headers:
        if name.lower() in (b"cache-tag", b"surrogate-key"):
            for tag in value.decode("latin-1").replace(",", " ").split():
                if tag not in tags:
                    tags.append(tag)
    return tuple(tags)
