"""The per-process store, bounded by bytes, evicting by S3-FIFO.

S3-FIFO (Yang et al., SOSP 2023): new objects enter a small FIFO (10 % of the bytes);
one that was used again while there moves to the main FIFO, one that was not leaves and
is remembered in a ghost FIFO of keys, so that if it comes back soon it goes straight to
main. Main is a FIFO with a reinsertion for each use (a 2-bit counter). One-hit wonders
(a crawler walking the catalogue) thus pass through the small queue without pushing the
popular objects out, which plain LRU lets them do.

The bound holds at every moment: room is made before an object is added, and an object
larger than ``max_object_size`` (or the whole store) is never added.
"""

from __future__ import annotations

from collections import OrderedDict

from proxy.cache.policy import Freshness
from proxy.cache.store import StoredResponse, StoreStats

SMALL_SHARE = 0.1
MAX_FREQUENCY = 3
MIN_GHOSTS = 1024

_Key = tuple[str, str]  # (primary, secondary)


class MemoryStore:
    def __init__(self, max_size: int, max_object_size: int) -> None:
        self.max_size = max_size
        self.max_object_size = min(max_object_size, max_size)
        self._variants: dict[str, dict[str, StoredResponse]] = {}
        self._by_url: dict[str, set[str]] = {}
        self._by_tag: dict[str, set[_Key]] = {}
        self._small: OrderedDict[_Key, int] = OrderedDict()  # key -> its size when added
        self._main: OrderedDict[_Key, int] = OrderedDict()
        self._ghost: OrderedDict[_Key, None] = OrderedDict()
        self._small_bytes = 0
        self.bytes = 0
        self.objects = 0
        self.evictions = 0

    # -- the interface ----------------------------------------------------------------------

    async def variants(self, primary: str) -> list[StoredResponse]:
        return self.variants_now(primary)

    def variants_now(self, primary: str) -> list[StoredResponse]:
        stored = self._variants.get(primary)
        if not stored:
            return []
        responses = list(stored.values())
        for response in responses:
            if response.frequency < MAX_FREQUENCY:
                response.frequency += 1
        return responses

    @property
    def variants_by_key(self) -> dict[str, dict[str, StoredResponse]]:
        """Every stored variant by primary key, then secondary: for ``hit.FreshHits``, which
        keeps it (the same dict for the store's life) and reads it in compiled code,
        counting a use as ``variants_now`` does."""
        return self._variants

    async def put(self, response: StoredResponse) -> bool:
        return self.put_now(response)

    def put_now(self, response: StoredResponse) -> bool:
        key = (response.primary, response.secondary)
        self._remove(key)
        size = response.size
        if len(response.body) > self.max_object_size or size > self.max_size:
            return False
        self._make_room(size)
        self._variants.setdefault(response.primary, {})[key[1]] = response
        self._by_url.setdefault(response.url, set()).add(response.primary)
        for tag in response.tags:
            self._by_tag.setdefault(tag, set()).add(key)
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = size
        else:
            self._small[key] = size
            self._small_bytes += size
        self.bytes += size
        self.objects += 1
        return True

    async def freshen(
        self, response: StoredResponse, headers: list[tuple[bytes, bytes]], freshness: Freshness
    ) -> None:
        key = (response.primary, response.secondary)
        if self._variants.get(response.primary, {}).get(key[1]) is not response:
            return  # purged or replaced meanwhile
        self._remove(key)
        response.headers = headers
        response.freshness = freshness
        self.put_now(response)

    async def delete(self, primary: str) -> int:
        return self._remove_all(primary)

    async def purge_url(self, url: str) -> int:
        return sum(self._remove_all(primary) for primary in list(self._by_url.get(url, ())))

    async def purge_prefix(self, prefix: str) -> int:
        urls = [url for url in self._by_url if url.startswith(prefix)]
        return sum(self._remove_all(p) for url in urls for p in list(self._by_url.get(url, ())))

    async def purge_tag(self, tag: str) -> int:
        keys = list(self._by_tag.get(tag, ()))
        return sum(self._remove(key) for key in keys)

    def stats(self) -> StoreStats:
        return StoreStats(self.objects, self.bytes, self.evictions)

    # -- bookkeeping ------------------------------------------------------------------------

    def _make_room(self, size: int) -> None:
        while self.bytes + size > self.max_size and self.objects:
            self._evict_one()

    def _evict_one(self) -> None:
        while True:
            if self._small and (self._small_bytes > self.max_size * SMALL_SHARE or not self._main):
                key, size = self._small.popitem(last=False)
                self._small_bytes -= size
                response = self._lookup(key)
                if response.frequency > 0:  # used again while on probation: promote
                    response.frequency = 0
                    self._main[key] = size
                    continue
                self._ghost[key] = None
                while len(self._ghost) > max(MIN_GHOSTS, self.objects):
                    self._ghost.popitem(last=False)
                self._forget(key, response, size)
                self.evictions += 1
                return
            key, size = self._main.popitem(last=False)
            response = self._lookup(key)
            if response.frequency > 0:
                response.frequency -= 1
                self._main[key] = size  # another lap
                continue
            self._forget(key, response, size)
            self.evictions += 1
            return

    def _lookup(self, key: _Key) -> StoredResponse:
        return self._variants[key[0]][key[1]]

    def _remove_all(self, primary: str) -> int:
        stored = self._variants.get(primary)
        if not stored:
            return 0
        return sum(self._remove((primary, secondary)) for secondary in list(stored))

    def _remove(self, key: _Key) -> int:
        """Drop ``key`` wherever it is queued; 1 when it was stored."""
        stored = self._variants.get(key[0])
        if stored is None or key[1] not in stored:
            return 0
        response = stored[key[1]]
        size = self._small.pop(key, None)
        if size is not None:
            self._small_bytes -= size
        else:
            size = self._main.pop(key)
        self._forget(key, response, size)
        return 1

    def _forget(self, key: _Key, response: StoredResponse, size: int) -> None:
        """Out of the indexes and the accounts (already out of its queue)."""
        stored = self._variants[key[0]]
        del stored[key[1]]
        if not stored:
            del self._variants[key[0]]
            primaries = self._by_url.get(response.url)
            if primaries is not None:
                primaries.discard(key[0])
                if not primaries:
                    del self._by_url[response.url]
        for tag in response.tags:
            keys = self._by_tag.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_tag[tag]
        self.bytes -= size
        self.objects -= 1
